# Adapters Mixup: Mixing Parameter-Efficient Adapters to Enhance the Adversarial Robustness of Fine-tuned Pre-trained
# Text Classifiers (EMNLP 2024, arXiv 2401.10111); usage, caches, what is logged, deviations: docs/adapter_mixup.md
"""AdpMixup (Nguyen & Le). A frozen PLM theta_0 gets bottleneck adapters; one adapter set phi_0 is trained on clean
data, one phi_k per known attack on its adversarial examples (warm-started from phi_0), and prediction uses the
convex combination phi_mix = sum_k beta_k phi_k of all adapter tensors and heads (v1: one fixed beta; v2: beta per
input from the entropies of each adapter's prediction). The paper's body was unavailable: equations are cited by
the section of ../shared/specs/adapter_mixup.md ("spec §x") and every reconstructed choice is a flag."""
import argparse
import copy
import csv
import hashlib
import itertools
import json
import math
import os
import time
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

import attacks
import common
import offline
from attacks import build_attack, callable_wrapper, evaluate_model, evaluate_robustness, print_summary
from common import (ATTACK_RECIPES, UsageError, add_common_args, check_range, count_params, evaluate_accuracy, finetune,
                    finish_run, load_model, load_task, make_loader, parse_attacks, results_template, set_seed,
                    start_run, texts_of, tokenize, usage_errors)

METHOD = "adapter_mixup"
ENTROPY_EPS = 1e-6  # s_k = 1 / (H_k + eps) (spec §3.6, variant A)
ADAPTER_INIT_STD = 1e-2  # W_down ~ N(0, 0.01^2), W_up = 0: every adapter starts as the identity (Houlsby et al.)
ADV_VAL_SHARE = 0.1  # share of each D_adv,k held out as adversarial validation (spec §3.3, step 4)
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "tanh": nn.Tanh}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, METHOD, lr=3e-4, epochs=10, attacks="textfooler,pwws,bert-attack,textbugger,deepwordbug")
    g = p.add_argument_group("AdpMixup")
    g.add_argument("--adapter-type", default="houlsby", choices=["houlsby", "pfeiffer"],
                   help="houlsby: adapter after attention and after FFN; pfeiffer: after FFN only (spec §3.2)")
    g.add_argument("--reduction-factor", type=int, default=16, help="bottleneck = hidden / r (spec §3.2: r = 16)")
    g.add_argument("--adapter-activation", default="relu", choices=list(ACTIVATIONS), help="adapter nonlinearity")
    g.add_argument("--train-attacks", default="textfooler",
                   help="known attacks a_1..a_m: one adversarial adapter phi_k each (spec §3.3); comma-separated")
    g.add_argument("--adv-train-examples", type=int, default=5000,
                   help="seeded train subset attacked per known attack (spec §3.3: min(|D_tr|, 5000))")
    g.add_argument("--adv-epochs", type=float, default=5, help="epochs of each adversarial adapter (spec §3.4: 5-10)")
    g.add_argument("--adv-lr", type=float, default=None, help="learning rate of adversarial adapters (default --lr)")
    g.add_argument("--cache-dir", default=None, help="clean-adapter checkpoints and adversarial-example JSONL "
                   "caches, reused across runs and resumed after interruption (default OUTPUT_DIR/adpmixup_cache)")
    g.add_argument("--beta", default="dynamic", help="mixing coefficient of the clean adapter: a number in [0, 1] "
                   "(v1, fixed), 'dev' (v1, chosen on the grid by (dev acc + adv-val acc) / 2), or 'dynamic' (v2, "
                   "per input from prediction entropies); the main row of results.json")
    g.add_argument("--dynamic-rule", default="inverse-entropy", choices=["inverse-entropy", "softmax", "min-entropy"],
                   help="v2 beta(x) (spec §3.6): beta_k ∝ 1/(H_k+eps) (A), softmax(-H/tau), or the simplex-grid "
                        "point minimising the mixed model's entropy (B)")
    g.add_argument("--temperature", type=float, default=1.0, help="tau of --dynamic-rule softmax (fixed unless "
                   "--v2-grid tunes it)")
    g.add_argument("--head-start", type=float, default=0.0, help="the clean adapter's head start b in v2: softmax "
                   "scores -H_k/tau + b [k = clean]; inverse-entropy scores x (1 + b) (fixed unless --v2-grid)")
    g.add_argument("--v2-grid", default="", help="tau:b pairs tried for v2 on dev with the adaptive objective, e.g. "
                   "'0.5:0,1:0,1:1,2:2' (needs --beta-attack-examples > 0); empty: --temperature/--head-start as given")
    g.add_argument("--beta-attack-examples", type=int, default=0, help="if > 0, v1's beta (and v2's tau:b) are "
                   "chosen on (dev clean acc + mean dev Aua) / 2, with every known attack run afresh on this many dev "
                   "sentences against each candidate (phi_0 is not 0 by construction there, as it is on adv-val)")
    g.add_argument("--beta-grid-step", type=float, default=0.1, help="step of the v1 grid / beta curve / simplex grid")
    g.add_argument("--curve-attack-examples", type=int, default=0, help="if > 0, run every --attacks recipe on this "
                   "many test examples at each beta of the curve (else the curve uses transfer adversarial sets)")
    g.add_argument("--gate-examples", type=int, default=100, help="dev sentences on which each adversarial adapter "
                   "and phi_0 are attacked with its own attack (paired): the gate that says whether it is more robust "
                   "(0: skip)")
    g.add_argument("--baseline", default="none", choices=["none", "full-at"],
                   help="full-at: also fully fine-tune the backbone on clean + the same adversarial data")
    g.add_argument("--full-lr", type=float, default=2e-5, help="learning rate of the full-at baseline")
    g.add_argument("--full-epochs", type=float, default=3, help="epochs of the full-at baseline")
    g.add_argument("--bench", action="store_true", help="print training cost of AdpMixup vs full adversarial "
                   "fine-tuning (seconds per step, trainable parameters) and inference passes, then exit")
    g.add_argument("--bench-steps", type=int, default=5, help="timed optimiser steps per model in --bench")
    return p.parse_args(argv)


def validate(args):
    common.validate_common_args(args)
    args.known = [a.strip().lower() for a in args.train_attacks.split(",") if a.strip()]
    if not args.known:
        raise UsageError("--train-attacks needs at least one attack")
    for name in args.known:
        if name not in ATTACK_RECIPES:
            raise UsageError(f"unknown attack '{name}' in --train-attacks; choose from: {', '.join(ATTACK_RECIPES)}")
    if args.beta not in ("dynamic", "dev"):
        try:
            args.beta = float(args.beta)
        except ValueError:
            raise UsageError(f"--beta must be a number in [0, 1], 'dev' or 'dynamic', got '{args.beta}'")
        check_range("beta", args.beta, 0, 1)
    check_range("reduction-factor", args.reduction_factor, 1)
    check_range("adv-train-examples", args.adv_train_examples, 1)
    check_range("adv-epochs", args.adv_epochs, 0, low_open=True)
    check_range("temperature", args.temperature, 0, low_open=True)
    check_range("beta-grid-step", args.beta_grid_step, 0, 1, low_open=True)
    if abs(round(1 / args.beta_grid_step) * args.beta_grid_step - 1) > 1e-6:
        raise UsageError(f"--beta-grid-step must divide 1 (e.g. 0.1, 0.25), got {args.beta_grid_step}")
    check_range("curve-attack-examples", args.curve_attack_examples, 0)
    check_range("bench-steps", args.bench_steps, 1)
    check_range("gate-examples", args.gate_examples, 0)
    check_range("beta-attack-examples", args.beta_attack_examples, 0)
    try:
        args.v2_pairs = [tuple(float(x) for x in p.split(":")) for p in args.v2_grid.split(",") if p.strip()]
    except ValueError:
        raise UsageError(f"--v2-grid is a comma list of tau:b pairs, e.g. 0.5:0,1:1, got '{args.v2_grid}'")
    if any(len(p) != 2 or p[0] <= 0 for p in args.v2_pairs):
        raise UsageError(f"--v2-grid pairs are tau:b with tau > 0, got '{args.v2_grid}'")
    if args.v2_pairs and not args.beta_attack_examples:
        raise UsageError("--v2-grid tunes v2 on the adaptive dev objective: give --beta-attack-examples > 0")
    for name in ("adv_lr", "full_lr", "full_epochs"):
        if getattr(args, name) is not None:
            check_range(name.replace("_", "-"), getattr(args, name), 0, low_open=True)
    if args.pgd_radius > 0:
        raise UsageError("--pgd-radius is not supported by adapter_mixup.py: the adapter rows are attacked through "
                         "the mixing predictor (text attacks only); drop the flag")
    args.adv_lr = args.adv_lr or args.lr
    args.cache_dir = args.cache_dir or os.path.join(args.output_dir, "adpmixup_cache")


# ---------------------------------------------------------------------------------------------------------------
# Adapters with several weight sets that mix per example (spec §3.2, §3.5, §3.7)
# ---------------------------------------------------------------------------------------------------------------
class Mixture:
    """Which adapter sets the next forward pass uses, with which convex weights beta; shared by every MixedLinear.
    beta None: the single set sets[0]; beta (S,): one mix for the batch; beta (B, S): one mix per example."""

    def __init__(self):
        self.sets, self.beta = [0], None

    def use(self, sets, beta=None):
        self.sets, self.beta = list(sets), None if beta is None else torch.as_tensor(beta, dtype=torch.float32)
        assert beta is not None or len(self.sets) == 1, "a mix of several sets needs beta"


class MixedLinear(nn.Module):
    """One nn.Linear per adapter set. Weight mixing of a linear map equals mixing its outputs (spec §3.7):
    (sum_k beta_k W_k) h + sum_k beta_k b_k = sum_k beta_k (W_k h + b_k), so per-example betas are exact in a batch."""

    def __init__(self, linears, mixture: Mixture):
        super().__init__()
        self.linears, self.mixture = nn.ModuleList(linears), mixture

    def forward(self, x):
        sets, beta = self.mixture.sets, self.mixture.beta
        if beta is None:
            return self.linears[sets[0]](x)
        outs = torch.stack([self.linears[k](x) for k in sets], dim=-1)  # (..., out, S)
        if beta.dim() == 2:  # (B, S) -> (B, 1, ..., 1, S)
            beta = beta.view(beta.size(0), *([1] * (x.dim() - 1)), beta.size(1))
        return (outs * beta.to(outs)).sum(-1)


class BottleneckAdapter(nn.Module):
    """h + W_up act(W_down h + b_down) + b_up (Houlsby et al., 2019); the nonlinearity acts on the *mixed* down-
    projection, so a mix of sets is the adapter with mixed weights, not an ensemble of adapters."""

    def __init__(self, hidden, bottleneck, n_sets, mixture, activation):
        super().__init__()
        downs, ups = [nn.Linear(hidden, bottleneck) for _ in range(n_sets)], [nn.Linear(bottleneck, hidden)
                                                                               for _ in range(n_sets)]
        for down, up in zip(downs, ups):
            nn.init.normal_(down.weight, std=ADAPTER_INIT_STD), nn.init.zeros_(down.bias)
            nn.init.zeros_(up.weight), nn.init.zeros_(up.bias)
        self.down, self.act, self.up = MixedLinear(downs, mixture), ACTIVATIONS[activation](), MixedLinear(ups, mixture)

    def forward(self, h):
        return h + self.up(self.act(self.down(h)))


class AdaptedOutput(nn.Module):
    """A frozen sub-layer output projection followed by its adapter, before the residual + LayerNorm."""

    def __init__(self, dense, adapter):
        super().__init__()
        self.dense, self.adapter = dense, adapter

    def forward(self, x):
        return self.adapter(self.dense(x))


def head_slots(model):
    """(owner, attribute) of the linear maps of the classification head: BERT pooler dense (+tanh) and classifier,
    or RoBERTa's dense (+tanh) and out_proj. Each adapter set gets its own copy."""
    if getattr(getattr(model, "bert", None), "pooler", None) is not None:
        return [(model.bert.pooler, "dense"), (model, "classifier")]
    if hasattr(getattr(model, "classifier", None), "out_proj"):
        return [(model.classifier, "dense"), (model.classifier, "out_proj")]
    raise UsageError(f"--model {type(model).__name__}: only BERT/RoBERTa-style classifiers are supported")


def add_adapters(model, n_sets, adapter_type, reduction_factor, activation) -> Mixture:
    """Freeze theta_0; insert n_sets adapter weight sets in every layer and n_sets heads; all sets start equal."""
    for p in model.parameters():
        p.requires_grad_(False)
    mixture, hidden = Mixture(), model.config.hidden_size
    bottleneck = max(1, hidden // reduction_factor)
    layers = getattr(getattr(model.base_model, "encoder", None), "layer", None)
    if layers is None:
        raise UsageError(f"--model {type(model).__name__}: no encoder.layer list to insert adapters into")
    for layer in layers:
        spots = [layer.output] if adapter_type == "pfeiffer" else [layer.attention.output, layer.output]
        for spot in spots:
            spot.dense = AdaptedOutput(spot.dense, BottleneckAdapter(hidden, bottleneck, n_sets, mixture, activation))
    for owner, name in head_slots(model):
        base = getattr(owner, name)
        setattr(owner, name, MixedLinear([copy.deepcopy(base).requires_grad_(True) for _ in range(n_sets)], mixture))
    for k in range(1, n_sets):
        copy_set(model, 0, k)
    return mixture


def mixed_linears(model):
    return [m for m in model.modules() if isinstance(m, MixedLinear)]


def set_params(model, k):
    return [p for m in mixed_linears(model) for p in m.linears[k].parameters()]


def train_only(model, k):
    """Only adapter set k (adapters + head) receives gradients; theta_0 and the other sets stay frozen."""
    for m in mixed_linears(model):
        for i, linear in enumerate(m.linears):
            linear.requires_grad_(i == k)


def set_state(model, k) -> dict:
    return {f"{i}.{n}": p.detach().cpu().clone() for i, m in enumerate(mixed_linears(model))
            for n, p in m.linears[k].named_parameters()}


@torch.no_grad()
def load_set_state(model, k, state):
    for i, m in enumerate(mixed_linears(model)):
        for n, p in m.linears[k].named_parameters():
            p.copy_(state[f"{i}.{n}"])


@torch.no_grad()
def copy_set(model, src, dst):
    for m in mixed_linears(model):
        for p_dst, p_src in zip(m.linears[dst].parameters(), m.linears[src].parameters()):
            p_dst.copy_(p_src)


@torch.no_grad()
def merge_sets(model, sets, beta, dst):
    """phi_mix = sum_k beta_k phi_k, tensor by tensor, adapters and heads (spec §3.5), written into set dst."""
    for m in mixed_linears(model):
        for name, p_dst in m.linears[dst].named_parameters():
            p_dst.copy_(sum(b * dict(m.linears[k].named_parameters())[name] for k, b in zip(sets, beta)))


def fingerprint(obj) -> str:
    h = hashlib.sha1()
    if isinstance(obj, dict) and all(torch.is_tensor(v) for v in obj.values()):
        for key in sorted(obj):
            h.update(key.encode()), h.update(obj[key].float().numpy().tobytes())
    else:
        h.update(json.dumps(obj, sort_keys=True, default=str).encode())
    return h.hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------------------
# The predictor: list[str] -> logits, beta computation included, so attacks query the whole defence (spec §3.7)
# ---------------------------------------------------------------------------------------------------------------
def entropy(logits):
    return -(F.softmax(logits.float(), -1) * F.log_softmax(logits.float(), -1)).sum(-1)


def dynamic_beta(entropies, rule="inverse-entropy", temperature=1.0, head_start=0.0):
    """(B, S) prediction entropies H_k -> (B, S) coefficients on the simplex (spec §3.6); column 0 is the clean
    adapter, given a head start b (deviation: with adapters that are small tweaks of phi_0 all H_k are alike and
    the rule without it returns the uniform soup on every input)."""
    if rule == "inverse-entropy":  # variant A: s_k = 1/(H_k + eps), beta_k = s_k / sum_j s_j
        scores = 1.0 / (entropies + ENTROPY_EPS)
        scores = torch.cat([scores[:, :1] * (1.0 + head_start), scores[:, 1:]], 1)
        return scores / scores.sum(-1, keepdim=True)
    bonus = torch.zeros_like(entropies)
    bonus[:, 0] = head_start
    return F.softmax((-entropies + bonus) / temperature, -1)


def simplex_grid(n_sets, step):
    n = round(1 / step)
    points = [c for c in itertools.product(range(n + 1), repeat=n_sets) if sum(c) == n]
    return torch.tensor(points, dtype=torch.float32) / n


class MixupPredictor:
    """beta None: adapter set sets[0] alone (a fixed mix is merged into a set first); 'dynamic': beta(x) from the
    entropies of the S single-set predictions (S passes batched by repeating the batch, plus the mixed pass);
    'ensemble': the control that mixes outputs, not weights: the mean of the S single sets' probabilities."""

    def __init__(self, model, tokenizer, mixture, sets, beta, args, device, autocast, rule="inverse-entropy"):
        self.model, self.tokenizer, self.mixture, self.sets, self.beta = model, tokenizer, mixture, sets, beta
        self.args, self.device, self.autocast, self.rule = args, device, autocast, rule
        self.candidates = torch.eye(len(sets)) if rule != "min-entropy" or beta == "ensemble" else simplex_grid(
            len(sets), args.beta_grid_step)

    def to(self, device):
        """Move the model (a spawned GPU attack worker's copy) to `device`."""
        self.model.to(device)
        self.device = device
        return self

    @property
    def passes(self):
        if self.beta not in ("dynamic", "ensemble"):
            return 1
        return len(self.candidates) + (self.rule != "min-entropy" and self.beta == "dynamic")

    @torch.no_grad()
    def mix(self, enc):
        """(logits, beta) for one tokenised batch."""
        self.model.eval()
        batch = enc["input_ids"].size(0)
        if self.beta not in ("dynamic", "ensemble"):
            self.mixture.use(self.sets, None)
            with self.autocast():
                logits = common._logits(self.model(**enc)).float()
            return logits, torch.ones(batch, 1)
        grid = self.candidates.size(0)  # copy g of the batch uses candidate mix g (one-hot = single adapter)
        self.mixture.use(self.sets, self.candidates.repeat_interleave(batch, 0).to(self.device))
        with self.autocast():
            logits = common._logits(self.model(**{k: v.repeat(grid, 1) for k, v in enc.items()})).float()
        logits = logits.view(grid, batch, -1)
        if self.beta == "ensemble":  # log of the mean probability: argmax and attacks see the averaged output
            return torch.logsumexp(F.log_softmax(logits, -1), 0) - math.log(grid), torch.full((batch, grid), 1 / grid)
        entropies = entropy(logits).T  # (B, G)
        if self.rule == "min-entropy":  # variant B: the grid point whose mixed model is most confident
            pick = entropies.argmin(1)
            return logits[pick, torch.arange(batch)], self.candidates[pick.cpu()]
        beta = dynamic_beta(entropies, self.rule, self.args.temperature, self.args.head_start)
        self.mixture.use(self.sets, beta)
        with self.autocast():
            return common._logits(self.model(**enc)).float(), beta.cpu()

    def run(self, texts):
        logits, betas = [], []
        for i in range(0, len(texts), self.args.eval_batch_size):
            chunk = list(texts[i: i + self.args.eval_batch_size])
            pair = isinstance(chunk[0], (tuple, list))
            inputs = ([t[0] for t in chunk], [t[1] for t in chunk]) if pair else (chunk,)
            enc = self.tokenizer(*inputs, truncation=True, max_length=self.args.max_seq_length, padding=True,
                                 return_tensors="pt").to(self.device)
            out, beta = self.mix(dict(enc))
            logits.append(out.cpu()), betas.append(beta.cpu())
        return torch.cat(logits).numpy(), torch.cat(betas).numpy()

    def __call__(self, texts):
        return self.run(texts)[0]


def accuracy(predict, texts, labels):
    return 100.0 * float(np.mean(predict(texts).argmax(-1) == np.asarray(labels))) if len(texts) else float("nan")


def auroc(negatives, positives):
    """P(score of a positive > score of a negative) + ties/2 (Mann-Whitney)."""
    neg, pos = np.asarray(negatives)[:, None], np.asarray(positives)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean()) if neg.size and pos.size else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# Adversarial training data: attack the clean model, keep successes, cache as JSONL (spec §3.3)
# ---------------------------------------------------------------------------------------------------------------
CACHE_VERSION = 2  # bumped when what a cache holds changes (2: generation seeded per example, complete keys)
CLEAN_KEY = ("model", "task", "data_dir", "seed", "max_train_examples", "max_eval_examples", "dev_size",
             "max_seq_length", "batch_size", "eval_batch_size", "lr", "epochs", "weight_decay", "warmup", "bf16",
             "adapter_type", "reduction_factor", "adapter_activation")  # with the device and CACHE_VERSION


def load_cached(path):
    """A cached checkpoint, or None when absent or unreadable (a cut file is trained again, not a crash)."""
    if not os.path.exists(path):
        return None
    try:
        return torch.load(path)
    except Exception as e:  # noqa: BLE001 -- any unreadable file: torch raises several types
        print(f"[cache] {path} is unreadable ({type(e).__name__}); training again", flush=True)
        return None


def read_jsonl(path):
    records = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                    records[record["index"]] = record
                except (json.JSONDecodeError, KeyError):
                    pass  # a line cut by an interruption: that example is attacked again
    return records


def json_text(text):
    return text if isinstance(text, str) else list(text)  # pairs as lists, in memory as in the JSONL file


def generate_adversarial(name, predict, samples, columns, path, args, resources=None):
    """Attack every (text, label) in samples; one JSONL line per finished example, so a rerun resumes."""
    from textattack.attack_results import SkippedAttackResult, SuccessfulAttackResult

    records = read_jsonl(path)
    todo = [i for i in range(len(samples)) if i not in records]
    if records:
        print(f"[stage 2] {name}: {len(records)} cached examples in {path}, {len(todo)} to attack", flush=True)
    if todo:
        attack = build_attack(name, callable_wrapper(predict), resources, args.attack_query_budget,
                              args.attack_max_modify_rate, args.eval_batch_size)
        with open(path, "a+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:
                f.seek(f.tell() - 1)
                if f.read(1) != "\n":  # the run was cut in the middle of a line: start a fresh one
                    f.write("\n")
            for i in tqdm(todo, desc=f"adv-gen {name}", leave=False, disable=None):
                text, label, start = *samples[i], time.time()
                set_seed(attacks.example_seed(args.attack_seed, i))  # an example's output depends on nothing else
                attack.clear_cache()
                result = attack.attack(OrderedDict(zip(columns, text)) if len(columns) > 1 else text, int(label))
                status = ("successful" if isinstance(result, SuccessfulAttackResult) else
                          "skipped" if isinstance(result, SkippedAttackResult) else "failed")
                perturbed = result.perturbed_result.attacked_text.tokenizer_input
                records[i] = {"index": i, "label": int(label), "status": status, "original": json_text(text),
                              "perturbed": json_text(perturbed),
                              "seconds": time.time() - start}
                f.write(json.dumps(records[i]) + "\n")
                f.flush()
    return [records[i] for i in range(len(samples))]


def rows_to_dataset(data, texts, labels):
    import datasets

    columns = data.text_columns
    return datasets.Dataset.from_list([{**dict(zip(columns, t if len(columns) > 1 else (t,))), "label": int(y)}
                                       for t, y in zip(texts, labels)])


def split_rows(ds_rows, share, seed):
    """(train, held-out) lists of (text, label); at least one held out when there are two or more."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ds_rows))
    n_val = int(round(share * len(ds_rows))) if len(ds_rows) < 2 else max(1, int(round(share * len(ds_rows))))
    return [ds_rows[i] for i in order[n_val:]], [ds_rows[i] for i in order[:n_val]]


# ---------------------------------------------------------------------------------------------------------------
# Training one adapter set, the --bench cost report
# ---------------------------------------------------------------------------------------------------------------
def train_set(model, mixture, k, train_rows, dev_rows, data, tokenizer, run, args, epochs, lr, tag):
    """Train adapter set k (backbone frozen) on (text, label) rows; keep its best state on dev_rows."""
    set_seed(args.seed)  # each set trains the same whether or not earlier stages came from the cache
    mixture.use([k])
    train_only(model, k)
    loader = lambda rows, bs, shuffle: make_loader(  # noqa: E731
        tokenize(data, rows_to_dataset(data, *zip(*rows)), tokenizer, args.max_seq_length), tokenizer, bs, shuffle,
        args.seed)
    stats = finetune(model, loader(train_rows, args.batch_size, True), loader(dev_rows, args.eval_batch_size, False),
                     run, epochs, lr, args.weight_decay, args.warmup, tag=tag, params=set_params(model, k))
    train_only(model, -1)
    return stats


def bench(args):
    """Seconds per training step and trainable parameters: one adapter set vs full fine-tuning, plus passes."""
    set_seed(args.seed)
    device = common.pick_device(args.cuda)
    data = load_task(args)
    full, tokenizer = load_model(args.model, data.num_labels, args.max_seq_length,
                                 os.path.join(args.output_dir, ".tiny-bert"))
    adapted = copy.deepcopy(full)
    mixture = add_adapters(adapted, 1 + len(args.known), args.adapter_type, args.reduction_factor,
                           args.adapter_activation)
    mixture.use([0])
    train_only(adapted, 0)
    rows = data.train.select(range(min(len(data.train), args.batch_size)))
    batch = next(iter(make_loader(tokenize(data, rows, tokenizer, args.max_seq_length), tokenizer, args.batch_size,
                                  False)))
    batch = {k: v.to(device) for k, v in batch.items()}
    timing = {}
    for name, model, params in (("full fine-tuning", full, list(full.parameters())),
                                ("adapter set", adapted, set_params(adapted, 0))):
        model.to(device).train()
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        for step in range(args.bench_steps + 1):  # step 0 is warm-up, not timed
            if step == 1:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.time()
            loss = F.cross_entropy(common._logits(model(**batch)), batch["labels"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        timing[name] = ((time.time() - start) / args.bench_steps, sum(p.numel() for p in params))
    backbone = count_params(full)["total"]
    m = len(args.known)
    print(f"bench ({args.model}, batch {args.batch_size}, {device}, {args.bench_steps} steps):")
    for name, (seconds, n) in timing.items():
        print(f"  {name:<18} {seconds:8.4f} s/step   trainable {n:>12,} ({100 * n / backbone:.2f}% of backbone)")
    ratio = timing["adapter set"][0] / timing["full fine-tuning"][0]
    print(f"  adapter / full step time: {ratio:.2f}x; AdpMixup trains 1 + m = {1 + m} adapter sets "
          f"({(1 + m) * timing['adapter set'][1]:,} params, "
          f"{100 * (1 + m) * timing['adapter set'][1] / backbone:.2f}% of backbone)")
    # projected training time with these flags, if every attacked example gave one adversarial text (upper bound);
    # the adversarial generation is the same for both and is left out
    n, adv = len(data.train), min(args.adv_train_examples, len(data.train))
    steps = lambda examples, epochs: np.ceil(examples / args.batch_size) * epochs  # noqa: E731
    adpmixup = timing["adapter set"][0] * (steps(n, args.epochs) + m * steps(2 * adv, args.adv_epochs))
    full_at = timing["full fine-tuning"][0] * steps(n + m * adv, args.full_epochs)
    print(f"  projected training (n={n}, m={m}, {adv} adversarial each): AdpMixup {adpmixup:.0f}s "
          f"(--epochs {args.epochs:g}, --adv-epochs {args.adv_epochs:g}) vs full AT {full_at:.0f}s "
          f"(--full-epochs {args.full_epochs:g}); a new attack costs AdpMixup "
          f"{timing['adapter set'][0] * steps(2 * adv, args.adv_epochs):.0f}s, full AT a full retraining")
    print(f"  inference passes per example: single adapter 1, AdpMixup v1 1, v2 {m + 2} (m + 1 entropies + mix)")
    return {"timing": timing, "ratio": ratio, "projected_seconds": {"adpmixup": adpmixup, "full_at": full_at}}


# ---------------------------------------------------------------------------------------------------------------
# Main: the algorithm (spec §3.8)
# ---------------------------------------------------------------------------------------------------------------
def main(args, resources=None):
    validate(args)
    if args.bench:
        return bench(args)
    run = start_run(args, METHOD, also_attacks=args.known)  # the training attacks too, before anything trains
    if resources is None and args.attack_substitutes:  # offline TextFooler/TextBugger stand-ins, built once
        resources = offline.offline_attack_resources(args.attack_substitutes)
    data = load_task(args)
    model, tokenizer = load_model(args.model, data.num_labels, args.max_seq_length,
                                  os.path.join(args.output_dir, ".tiny-bert"))
    backbone = count_params(model)
    slots = ["clean"] + [f"adv-{a}" for a in args.known] + ["at", "soup", "v1", "curve"]
    slot = {name: i for i, name in enumerate(slots)}
    mixture = add_adapters(model, len(slots), args.adapter_type, args.reduction_factor, args.adapter_activation)
    model.to(run.device)
    init_state = set_state(model, 0)
    per_set = sum(p.numel() for p in set_params(model, 0))
    print(f"[{METHOD}] backbone {backbone['total']:,} params (frozen); one adapter set + head {per_set:,} "
          f"({100 * per_set / backbone['total']:.2f}%)", flush=True)
    results = results_template(args, METHOD, "adpmixup", None)
    wall, extra, warnings = results["wall_clock"], results["extra"], []
    os.makedirs(args.cache_dir, exist_ok=True)
    clean_rows = list(zip(texts_of(data, data.train), data.train["label"]))
    dev_rows = list(zip(texts_of(data, data.dev), data.dev["label"]))
    test_texts, test_labels = texts_of(data, data.test), list(data.test["label"])
    predictor = lambda sets, beta=None: MixupPredictor(  # noqa: E731
        model, tokenizer, mixture, [slot[s] for s in sets], beta, args, run.device, run.autocast, args.dynamic_rule)

    # ---- Stage 1: clean adapter phi_0 on D_tr, best on dev (spec §3.4 step 1); reused from the cache if trained
    print("=== Stage 1: clean adapter ===", flush=True)
    config = {k: getattr(args, k) for k in CLEAN_KEY} | {"device": run.device.type, "version": CACHE_VERSION}
    clean_path = os.path.join(args.cache_dir, f"clean_{fingerprint(config)}.pt")
    saved = load_cached(clean_path)
    if saved is not None:
        load_set_state(model, 0, saved["state"])
        clean_stats = {**saved["stats"], "cached": clean_path}
        print(f"[stage 1] clean adapter loaded from {clean_path}", flush=True)
    else:
        clean_stats = train_set(model, mixture, 0, clean_rows, dev_rows, data, tokenizer, run, args, args.epochs,
                                args.lr, "clean_adapter")
        torch.save({"state": set_state(model, 0), "stats": clean_stats, "config": config}, f"{clean_path}.tmp")
        os.replace(f"{clean_path}.tmp", clean_path)  # a kill never leaves a cut checkpoint under the cache name
    wall["clean_adapter"] = clean_stats["seconds"]
    clean_id = fingerprint(set_state(model, 0))

    # ---- Stage 2: D_adv,k = successful attacks a_k on the clean model, gold labels kept (spec §3.3)
    print("=== Stage 2: adversarial training data ===", flush=True)
    rng = np.random.default_rng(args.seed)
    picked = np.sort(rng.choice(len(clean_rows), size=min(args.adv_train_examples, len(clean_rows)), replace=False))
    samples = [clean_rows[i] for i in picked]
    adv_train, adv_val, extra["adversarial_data"], wall["adversarial_generation"] = {}, {}, {}, 0.0
    for name in args.known:
        start = time.time()
        key = fingerprint([name, clean_id, samples, args.attack_query_budget, args.attack_max_modify_rate,
                           args.max_seq_length, args.attack_seed, getattr(resources, "label", None) or "real",
                           args.attack_substitutes and os.path.abspath(args.attack_substitutes), CACHE_VERSION])
        path = os.path.join(args.cache_dir, f"adv_{name}_{key}.jsonl")
        records = generate_adversarial(name, predictor(["clean"]), samples, data.text_columns, path, args, resources)
        kept = [(r["perturbed"] if len(data.text_columns) == 1 else tuple(r["perturbed"]), r["label"])
                for r in records if r["status"] == "successful"]
        counts = {s: sum(r["status"] == s for r in records) for s in ("successful", "failed", "skipped")}
        seconds = sum(r.get("seconds", 0.0) for r in records)  # the generation cost, also when read from cache
        wall["adversarial_generation"] += seconds
        extra["adversarial_data"][name] = {**counts, "attacked": len(records), "cache": path, "seconds": seconds,
                                           "seconds_this_run": time.time() - start,
                                           "success_rate": 100.0 * counts["successful"] /
                                           max(1, counts["successful"] + counts["failed"])}
        print(f"[stage 2] {name}: {counts['successful']} successful / {counts['failed']} failed / "
              f"{counts['skipped']} skipped of {len(records)} ({seconds:.0f}s)", flush=True)
        if not kept:
            warnings.append(f"no {name} attack succeeded on the {len(records)} attacked training examples; "
                            f"no adversarial adapter for {name}")
            print(f"warning: {warnings[-1]}", flush=True)
            continue
        adv_train[name], adv_val[name] = split_rows(kept, ADV_VAL_SHARE, args.seed)
        extra["adversarial_data"][name].update(kept_train=len(adv_train[name]), kept_val=len(adv_val[name]))
    known = list(adv_train)  # attacks that have an adversarial adapter
    adv_val_rows = [row for name in known for row in adv_val[name]]

    # ---- Stage 3: phi_k from phi_0 on D_adv,k + an equal clean sample (spec §3.4 step 2); AT adapter baseline
    print("=== Stage 3: adversarial adapters ===", flush=True)
    wall["adversarial_adapters"], train_stats = 0.0, {"clean": clean_stats}
    for name in known:
        copy_set(model, 0, slot[f"adv-{name}"])
        clean_sample = [clean_rows[i] for i in rng.choice(len(clean_rows), len(adv_train[name]), replace=False)] \
            if len(adv_train[name]) <= len(clean_rows) else clean_rows
        # selected on dev and adv-val weighted equally: adv-val repeated to dev's size (it is ~10x smaller)
        balanced = dev_rows + adv_val[name] * max(1, round(len(dev_rows) / max(1, len(adv_val[name]))))
        stats = train_set(model, mixture, slot[f"adv-{name}"], adv_train[name] + clean_sample, balanced, data,
                          tokenizer, run, args, args.adv_epochs, args.adv_lr, f"adv_adapter_{name}")
        wall["adversarial_adapters"] += stats["seconds"]
        train_stats[f"adv-{name}"] = stats
    extra["gate"] = {name: adapter_gate(name, predictor(["clean"]), predictor([f"adv-{name}"]), dev_rows, data, args,
                                        resources, warnings) for name in known if args.gate_examples}
    if known:  # adversarial training of one adapter on D_tr ∪ all D_adv,k, from the same initialisation as phi_0
        load_set_state(model, slot["at"], init_state)
        train_stats["at"] = train_set(model, mixture, slot["at"], clean_rows + [r for n in known for r in adv_train[n]],
                                      dev_rows + adv_val_rows, data, tokenizer, run, args, args.epochs, args.lr,
                                      "at_adapter")
        wall["at_adapter"] = train_stats["at"]["seconds"]
    torch.save({"slots": slots, "state": {s: set_state(model, i) for s, i in slot.items()}, "args": vars(args)},
               os.path.join(run.dir, "adapters.pt"))

    # ---- Stage 4: mixing in weight space; v1 beta on the grid, the beta curve (spec §3.5)
    print("=== Stage 4: mixing ===", flush=True)
    mix_sets = ["clean"] + [f"adv-{a}" for a in known]
    m = len(known)
    spread = lambda beta: [beta] + [(1 - beta) / m] * m  # noqa: E731  beta on phi_0, the rest shared equally
    curve, grid = [], np.round(np.arange(0, 1 + 1e-9, args.beta_grid_step), 6).tolist()
    dev_texts, dev_labels = [t for t, _ in dev_rows], [y for _, y in dev_rows]
    for beta in grid if known else []:
        merge_sets(model, [slot[s] for s in mix_sets], spread(beta), slot["curve"])
        point = {"beta": beta, "dev_clean": accuracy(predictor(["curve"]), dev_texts, dev_labels),
                 "adv_val": accuracy(predictor(["curve"]), *zip(*adv_val_rows)) if adv_val_rows else float("nan"),
                 "test_clean": accuracy(predictor(["curve"]), test_texts, test_labels)}
        point["objective"] = point["dev_clean"] if not adv_val_rows else (point["dev_clean"] + point["adv_val"]) / 2
        if args.beta_attack_examples:  # the adaptive objective: the known attacks afresh on dev, at this beta
            point.update(adaptive_objective(predictor(["curve"]), point["dev_clean"], known, dev_rows, data, args,
                                            resources))
        if args.curve_attack_examples and parse_attacks(args.attacks):
            curve_args = copy.copy(args)
            curve_args.attack_examples = args.curve_attack_examples
            attacks = evaluate_robustness(predictor(["curve"]), data, curve_args, run, f"curve{beta:g}_", resources)
            point.update({f"aua_{a}": v["aua"] for a, v in attacks.items() if "error" not in v})
        curve.append(point)
        run.log({f"charts/beta_curve_{k}": v for k, v in point.items() if k != "beta"}, int(round(beta * 100)))
        print(f"[stage 4] beta {beta:.2f}: " + "  ".join(f"{k} {v:.1f}" for k, v in point.items() if k != "beta"),
              flush=True)
    beta_v1 = args.beta if isinstance(args.beta, float) else 1.0  # v1: fixed, or the best grid point on dev
    if curve and not isinstance(args.beta, float):
        key = "adaptive_objective" if args.beta_attack_examples else "objective"
        beta_v1 = max(curve, key=lambda point: (point[key], point["beta"]))["beta"]  # ties: more clean
    if known:
        merge_sets(model, [slot[s] for s in mix_sets], spread(beta_v1), slot["v1"])
        merge_sets(model, [slot[s] for s in mix_sets], [1 / (m + 1)] * (m + 1), slot["soup"])
    extra["beta_curve"] = {"points": curve, "csv": "beta_curve.csv", "png": "beta_curve.png"}
    if curve:
        write_curve(run.dir, curve)

    if known and args.v2_pairs:  # v2's tau and head start on the same adaptive dev objective
        tried = []
        for tau, head in args.v2_pairs:
            args.temperature, args.head_start = tau, head
            v2 = predictor(mix_sets, "dynamic")
            tried.append({"tau": tau, "head_start": head, **adaptive_objective(
                v2, accuracy(v2, dev_texts, dev_labels), known, dev_rows, data, args, resources)})
            print(f"[stage 4] v2 tau {tau:g} head start {head:g}: objective {tried[-1]['adaptive_objective']:.1f}",
                  flush=True)
        pick = max(tried, key=lambda t: (t["adaptive_objective"], t["head_start"]))  # ties: more clean
        args.temperature, args.head_start = pick["tau"], pick["head_start"]
        extra["v2_tuning"] = {"tried": tried, "tau": pick["tau"], "head_start": pick["head_start"]}

    # ---- Stage 5: every predictor, attacked as a whole (spec §7), plus transfer sets and profiling
    print("=== Stage 5: evaluation ===", flush=True)
    generation, mixing = ["clean_adapter", "adversarial_generation"], ["adversarial_adapters"]
    rows_spec = [("clean", "clean adapter", predictor(["clean"]), ["clean_adapter"])]
    rows_spec += [(f"adv-{a}", f"adv adapter ({a})", predictor([f"adv-{a}"]), generation + mixing) for a in known]
    if known:
        rows_spec += [("at", "AT adapter (clean+adv)", predictor(["at"]), generation + ["at_adapter"]),
                      ("soup", f"soup (beta={1 / (m + 1):.2f})", predictor(["soup"]), generation + mixing),
                      ("ensemble", "output ensemble (control)", predictor(mix_sets, "ensemble"), generation + mixing),
                      ("v1", f"AdpMixup v1 (beta={beta_v1:g})", predictor(["v1"]), generation + mixing),
                      ("v2", f"AdpMixup v2 ({args.dynamic_rule})", predictor(mix_sets, "dynamic"), generation + mixing)]
    rows, transfer_sets = [], {}
    attacked = {}  # weights fingerprint -> (row key, attacks): v1 at a grid end or at 1/(m+1) is another row's weights
    for key, setting, predict, cost in rows_spec:
        start = time.time()
        stored = per_set * (len(mix_sets) if key in ("soup", "v1", "v2", "ensemble") else 1)
        row = {"key": key, "setting": setting, "passes_per_example": predict.passes,
               "params": {"trainable": stored, "trainable_pct_of_backbone": 100 * stored / backbone["total"],
                          "total": backbone["total"] + stored},
               "dev_accuracy": accuracy(predict, dev_texts, dev_labels),
               "clean_accuracy": accuracy(predict, test_texts, test_labels)}
        print(f"[eval {key}] clean test accuracy {row['clean_accuracy']:.2f}%", flush=True)
        weights = fingerprint(set_state(model, slot[key])) if key in slot else None  # None: v2 mixes per input
        if weights in attacked:  # bit-identical weights and seeded attacks: the same results
            print(f"[eval {key}] same weights as the {attacked[weights][0]} row: its attack results reused", flush=True)
            row["attacks"] = copy.deepcopy(attacked[weights][1])
        else:
            row["attacks"] = evaluate_robustness(predict, data, args, run, f"{key}_", resources, row=row)
            if weights is not None:
                attacked[weights] = (key, row["attacks"])
        mark_known(row, known)
        if key == "clean":
            transfer_sets = read_transfer_sets(run.dir, row["attacks"], data)
        row["transfer"] = {a: accuracy(predict, *zip(*s)) for a, s in transfer_sets.items() if s}
        row["wall_clock"] = {**{c: wall.get(c, 0.0) for c in cost}, "evaluation": time.time() - start}
        rows.append(row)
    if known:
        extra["profiling"] = profile(predictor(mix_sets, "dynamic"), mix_sets, test_texts,
                                     transfer_sets or {a: adv_val[a] for a in known},
                                     "test transfer sets" if transfer_sets else "train-side adversarial validation")

    # ---- Stage 6 (optional): full fine-tuning on the same clean + adversarial data (the expensive baseline)
    if args.baseline == "full-at":
        print("=== Stage 6: full adversarial fine-tuning baseline ===", flush=True)
        rows.append(full_at_baseline(args, data, run, clean_rows + [r for n in known for r in adv_train[n]],
                                     dev_rows + adv_val_rows, known, transfer_sets, wall, resources))

    main_key = ("v2" if args.beta == "dynamic" else "v1") if known else "clean"
    main_row = next(r for r in rows if r["key"] == main_key)
    results.update(setting=main_row["setting"], params={"total": main_row["params"]["total"],
                   "non_embedding": backbone["non_embedding"] + main_row["params"]["trainable"]},
                   dev_accuracy=main_row["dev_accuracy"], clean_accuracy=main_row["clean_accuracy"],
                   attacks=main_row["attacks"])
    extra.update(rows=rows, beta_v1=beta_v1, known_attacks=known, unknown_attacks=[a for a in parse_attacks(
        args.attacks) if a not in known], training=train_stats, per_adapter_set_params=per_set, warnings=warnings,
        backbone_params=backbone, adapter={"type": args.adapter_type, "reduction_factor": args.reduction_factor,
                                           "activation": args.adapter_activation})
    finish_run(run, results)
    print_summary([(r["setting"][:27], r) for r in rows])
    for w in warnings:
        print(f"warning: {w}")
    return results


def dev_attack(name, predict, dev_rows, data, args, resources, n) -> list:
    """Robust (True) / not, per example, of `n` seeded dev sentences under recipe `name` run afresh on `predict`."""
    rng = np.random.default_rng(args.attack_seed)
    sample = [dev_rows[i] for i in np.sort(rng.choice(len(dev_rows), size=min(n, len(dev_rows)), replace=False))]
    attack = build_attack(name, callable_wrapper(predict), resources, args.attack_query_budget,
                          args.attack_max_modify_rate, args.eval_batch_size)
    summary, _ = attacks.run_attack(attack, sample, data.text_columns, desc=f"dev {name}", attack_seed=args.attack_seed)
    return [o == "F" for o in summary["outcomes"]]  # F: the attack failed, the example held


def adaptive_objective(predict, dev_clean, known, dev_rows, data, args, resources) -> dict:
    """(dev clean accuracy + mean over the known attacks of dev Aua, each attack run on this predictor) / 2."""
    auas = {f"dev_aua_{name}": 100.0 * float(np.mean(dev_attack(name, predict, dev_rows, data, args, resources,
                                                                 args.beta_attack_examples))) for name in known}
    return {**auas, "adaptive_objective": (dev_clean + float(np.mean(list(auas.values())))) / 2}


def adapter_gate(name, clean_predict, adv_predict, dev_rows, data, args, resources, warnings) -> dict:
    """Does the adversarial adapter phi_k resist its own attack a_k better than phi_0? Both attacked afresh (not the
    transfer examples phi_0 failed on by construction) on the same seeded dev sentences; paired interval. The mix
    can only help if phi_k passes."""
    robust = {who: dev_attack(name, predict, dev_rows, data, args, resources, args.gate_examples)
              for who, predict in (("clean", clean_predict), ("adversarial", adv_predict))}
    delta, low, high = attacks.paired_interval(robust["adversarial"], robust["clean"], seed=args.attack_seed)
    n = len(robust["clean"])
    gate = {"n": n, "aua_clean": 100.0 * np.mean(robust["clean"]),
            "aua_adversarial": 100.0 * np.mean(robust["adversarial"]), "delta": delta, "ci": [low, high],
            "passed": low > 0}
    print(f"[gate {name}] dev Aua under {name}: phi_0 {gate['aua_clean']:.1f}% vs adversarial adapter "
          f"{gate['aua_adversarial']:.1f}% (n={n}): {delta:+.1f} [{low:+.1f}, {high:+.1f}] -> "
          f"{'passed' if gate['passed'] else 'NOT passed'}", flush=True)
    if not gate["passed"]:
        warnings.append(f"the {name} adversarial adapter is not more robust than the clean adapter under {name} on "
                        f"dev beyond the paired interval ({delta:+.1f} [{low:+.1f}, {high:+.1f}] points, n={n}): "
                        f"mixing it in cannot be expected to help")
    return gate


def mark_known(row, known):
    for name, metrics in row["attacks"].items():
        metrics["known"] = name in known
    for group, flag in (("known", True), ("unknown", False)):
        auas = [m["aua"] for m in row["attacks"].values() if m["known"] == flag and "error" not in m]
        row[f"aua_{group}_mean"] = float(np.mean(auas)) if auas else None


def read_transfer_sets(run_dir, attacks, data):
    """Successful adversarial test texts against the clean adapter, per attack (single-text tasks only)."""
    if len(data.text_columns) > 1:
        return {}
    sets = {}
    for name, metrics in attacks.items():
        if "error" in metrics:  # that recipe failed: no transfer set
            continue
        with open(os.path.join(run_dir, metrics["csv"]), newline="") as f:
            sets[name] = [(r["perturbed_text"], int(r["ground_truth"])) for r in csv.DictReader(f)
                          if r["result"] == "Successful"]
    return sets


def profile(predict, mix_sets, clean_texts, adversarial, source):
    """Which known attack each input most resembles (argmax_{k>=1} beta_k) and detection AUROC of 1 - beta_0."""
    _, clean_beta = predict.run(clean_texts)
    out = {"source": source, "mean_beta_clean_on_clean": float(clean_beta[:, 0].mean()), "by_attack": {}}
    scores = []
    for name, rows in adversarial.items():
        if not rows:
            continue
        _, beta = predict.run([t for t, _ in rows])
        attributed = [mix_sets[1 + k] if beta[i, 0] < beta[i, 1 + k] else "clean"
                      for i, k in enumerate(beta[:, 1:].argmax(1))]
        out["by_attack"][name] = {"n": len(rows), "mean_beta_clean": float(beta[:, 0].mean()),
                                  "attributed": {s: attributed.count(s) for s in mix_sets}}
        scores.append(1 - beta[:, 0])
    if scores:
        out["detection_auroc"] = auroc(1 - clean_beta[:, 0], np.concatenate(scores))
        print(f"[profile] detection AUROC (1 - beta_clean, clean vs adversarial {source}): "
              f"{out['detection_auroc']:.3f}", flush=True)
    return out


def write_curve(run_dir, curve):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(run_dir, "beta_curve.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(curve[0]))
        writer.writeheader()
        writer.writerows(curve)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key in curve[0]:
        if key not in ("beta", "objective"):
            ax.plot([p["beta"] for p in curve], [p[key] for p in curve], marker="o", label=key)
    ax.set_xlabel("beta (weight of the clean adapter)"), ax.set_ylabel("accuracy %"), ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "beta_curve.png"), dpi=120)
    plt.close(fig)


def full_at_baseline(args, data, run, train_rows, dev_rows, known, transfer_sets, wall, resources):
    model, tokenizer = load_model(args.model, data.num_labels, args.max_seq_length,
                                  os.path.join(args.output_dir, ".tiny-bert"))
    loader = lambda rows, bs, shuffle: make_loader(  # noqa: E731
        tokenize(data, rows_to_dataset(data, *zip(*rows)), tokenizer, args.max_seq_length), tokenizer, bs, shuffle,
        args.seed)
    stats = finetune(model, loader(train_rows, args.batch_size, True), loader(dev_rows, args.eval_batch_size, False),
                     run, args.full_epochs, args.full_lr, args.weight_decay, args.warmup, tag="full_at")
    wall["full_at"] = stats["seconds"]
    start, n = time.time(), count_params(model)["total"]
    row = {"key": "full-at", "setting": "full AT (clean+adv)", "passes_per_example": 1,
           "params": {"trainable": n, "trainable_pct_of_backbone": 100.0, "total": n}}
    evaluate_model(model, tokenizer, data, args, run, row, "full-at_", resources=resources)
    dev = make_loader(tokenize(data, data.dev, tokenizer, args.max_seq_length), tokenizer, args.eval_batch_size, False)
    row["dev_accuracy"] = 100.0 * evaluate_accuracy(model, dev, run.device, run.autocast)
    mark_known(row, known)
    predict = attacks.Predictor(model, tokenizer, args.max_seq_length, args.eval_batch_size, run.device, run.autocast)
    row["transfer"] = {a: accuracy(predict, *zip(*s)) for a, s in transfer_sets.items() if s}
    row["wall_clock"] = {"clean_adapter": wall["clean_adapter"], "adversarial_generation":
                         wall["adversarial_generation"], "full_at": stats["seconds"], "evaluation": time.time() - start}
    return row


if __name__ == "__main__":
    with usage_errors():
        main(parse_args())
