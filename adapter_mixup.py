# Adapters Mixup: Mixing Parameter-Efficient Adapters to Enhance the Adversarial Robustness of Fine-tuned Pre-trained
# Text Classifiers (EMNLP 2024, arXiv 2401.10111); usage, caches, what is logged, deviations: docs/adapter_mixup.md
"""AdpMixup (Nguyen & Le). A frozen PLM theta_0 with a clean adapter phi_0 and one adversarial adapter phi_k per known
attack, predicting with phi_mix = sum_k beta_k phi_k of all adapter tensors and heads (v1: one beta; v2: beta per
input from each adapter's prediction entropy). The paper's body was unavailable: "spec §x" cites the sections of
../shared/specs/adapter_mixup.md, and every reconstructed choice is a flag."""
import argparse
import copy
import itertools
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import attacks
import bench
import common
from common import (UsageError, add_common_args, count_params, fingerprint_tensors, load_model, load_task,
                    parse_attacks, results_template, rows_accuracy, set_seed, start_run, texts_of, usage_errors)

METHOD = "adapter_mixup"
ENTROPY_EPS = 1e-6  # s_k = 1 / (H_k + eps) (spec §3.6, variant A)
ADAPTER_INIT_STD = 1e-2  # W_down ~ N(0, 0.01^2), W_up = 0: every adapter starts as the identity (Houlsby et al.)
ADV_VAL_SHARE = 0.1  # share of each D_adv,k held out as adversarial validation (spec §3.3, step 4)
INDEPENDENT_SEED_OFFSET = 1000  # --transfer-source independent: a clean adapter trained under --seed + this
CACHE_VERSION = 3  # bumped when what a cache holds changes (history: docs/adapter_mixup.md, deviation 11)
CLEAN_KEY = ("model", "task", "data_dir", "seed", "max_train_examples", "max_eval_examples", "dev_size",
             "max_seq_length", "batch_size", "eval_batch_size", "lr", "epochs", "weight_decay", "warmup", "bf16",
             "adapter_type", "reduction_factor", "adapter_activation")  # with the device and CACHE_VERSION
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "tanh": nn.Tanh}
POSITIVE, NON_NEGATIVE, AT_LEAST_ONE, FRACTION = (0, None, True), (0, None, False), (1, None, False), (0, 1, True)
# The method's flags: flag, default, type / choices / argparse keywords, range (low, high, low open), help
FLAGS = [
    ("--adapter-type", "houlsby", ["houlsby", "pfeiffer"], None, "after attention and FFN, or FFN only (spec §3.2)"),
    ("--reduction-factor", 16, int, AT_LEAST_ONE, "bottleneck = hidden / r (spec §3.2)"),
    ("--adapter-activation", "relu", list(ACTIVATIONS), None, "adapter nonlinearity"),
    ("--train-attacks", "textfooler", str, None, "known attacks a_1..a_m: one adversarial adapter phi_k each (§3.3)"),
    ("--adv-train-examples", 5000, int, AT_LEAST_ONE, "seeded train subset attacked per known attack"),
    ("--adv-epochs", 5, float, POSITIVE, "epochs of each adversarial adapter (spec §3.4: 5-10)"),
    ("--adv-lr", None, float, POSITIVE, "learning rate of the adversarial adapters (default --lr)"),
    ("--cache-dir", None, str, None, "clean adapters and adversarial data, reused (default OUTPUT_DIR/adpmixup_cache)"),
    ("--resume", None, {"metavar": "RUN_DIR"}, None, "continue this run folder in place (same flags)"),
    ("--beta", "dynamic", str, None, "phi_0's weight: in [0, 1] (v1), 'dev' (v1 chosen on dev), 'dynamic' (v2)"),
    ("--dynamic-rule", "inverse-entropy", ["inverse-entropy", "softmax", "min-entropy"], None,
     "v2 beta(x) (spec §3.6): ∝ 1/(H_k+eps) (A), softmax(-H/tau), or min-entropy grid point (B)"),
    ("--temperature", 1.0, float, POSITIVE, "tau of the softmax rule (unless --v2-grid)"),
    ("--head-start", 0.0, float, None, "phi_0's head start b in v2 (unless --v2-grid)"),
    ("--v2-grid", "", str, None, "tau:b pairs tried for v2 on the adaptive dev objective, e.g. 0.5:0,1:1"),
    ("--beta-attack-examples", 0, int, NON_NEGATIVE, "> 0: v1 and v2 chosen on (dev acc + dev Aua) / 2, on this many"),
    ("--beta-grid-step", 0.1, float, FRACTION, "step of the v1 grid, the beta curve and the simplex grid"),
    ("--curve-attack-examples", 0, int, NON_NEGATIVE, "> 0: every --attacks recipe on this many at each beta"),
    ("--gate-examples", 100, int, NON_NEGATIVE, "dev sentences of the gate: phi_k vs phi_0 under a_k (0: no gate)"),
    ("--transfer-source", "clean", ["clean", "independent"], None, "transfer sets attacked on phi_0 or an "
     "independent clean adapter (--seed + 1000)"),
    ("--baseline", "none", ["none", "full-at"], None, "full-at: also fine-tune the whole backbone on the same data"),
    ("--full-lr", 2e-5, float, POSITIVE, "learning rate of the full-at baseline"),
    ("--full-epochs", 3, float, POSITIVE, "epochs of the full-at baseline"),
    ("--bench", False, {"action": "store_true"}, None, "print training cost vs full AT and inference passes; exit"),
    ("--bench-steps", 5, int, AT_LEAST_ONE, "timed optimiser steps per model in --bench")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, METHOD, lr=3e-4, epochs=10, attacks="textfooler,pwws,bert-attack,textbugger,deepwordbug")
    g = p.add_argument_group("AdpMixup (each flag in detail: docs/adapter_mixup.md)")
    for flag, default, kind, _, help in FLAGS:
        options = kind if isinstance(kind, dict) else {"choices": kind} if isinstance(kind, list) else {"type": kind}
        g.add_argument(flag, default=default, help=help, **options)
    return p.parse_args(argv)


def validate(args):
    common.validate_common_args(args)
    args.known = parse_attacks(args.train_attacks, "--train-attacks")
    if not args.known:
        raise UsageError("--train-attacks needs at least one attack")
    if args.beta not in ("dynamic", "dev"):
        try:
            args.beta = float(args.beta)
        except ValueError:
            raise UsageError(f"--beta must be a number in [0, 1], 'dev' or 'dynamic', got '{args.beta}'")
        common.check_range("beta", args.beta, 0, 1)
    for flag, _, _, (low, high, low_open), _ in (f for f in FLAGS if f[3]):  # None (--adv-lr: --lr) not checked
        common.check_ranges(args, [flag[2:].replace("-", "_")], low, high, low_open)
    if abs(round(1 / args.beta_grid_step) * args.beta_grid_step - 1) > 1e-6:
        raise UsageError(f"--beta-grid-step must divide 1 (e.g. 0.1, 0.25), got {args.beta_grid_step}")
    try:
        args.v2_pairs = [tuple(float(x) for x in p.split(":")) for p in args.v2_grid.split(",") if p.strip()]
    except ValueError:
        raise UsageError(f"--v2-grid is a comma list of tau:b pairs, e.g. 0.5:0,1:1, got '{args.v2_grid}'")
    if any(len(p) != 2 or p[0] <= 0 for p in args.v2_pairs):
        raise UsageError(f"--v2-grid pairs are tau:b with tau > 0, got '{args.v2_grid}'")
    if args.v2_pairs and not args.beta_attack_examples:
        raise UsageError("--v2-grid tunes v2 on the adaptive dev objective: give --beta-attack-examples > 0")
    if args.transfer_source == "independent" and not parse_attacks(args.attacks):
        raise UsageError("--transfer-source independent attacks the test sample with --attacks: give some recipes")
    if args.pgd_radius > 0:
        raise UsageError("--pgd-radius is not supported (text attacks on the mixing predictor only): drop the flag")
    args.adv_lr = args.adv_lr or args.lr
    args.cache_dir = args.cache_dir or os.path.join(args.output_dir, "adpmixup_cache")


# ---- Adapters with several weight slots that mix per example (spec §3.2, §3.5, §3.7) ---------------------------------
class Mixture:
    """Which adapter slots the next forward pass uses, with which convex weights beta; shared by every MixedLinear.
    beta None: the single slot slots[0]; beta (S,): one mix for the batch; beta (B, S): one mix per example."""

    slots, beta = [0], None

    def use(self, slots, beta=None):
        self.slots, self.beta = list(slots), None if beta is None else torch.as_tensor(beta, dtype=torch.float32)
        assert beta is not None or len(self.slots) == 1, "a mix of several slots needs beta"


class MixedLinear(nn.Module):
    """One nn.Linear per adapter slot. Weight mixing of a linear map equals mixing its outputs (spec §3.7):
    (sum_k beta_k W_k) h + sum_k beta_k b_k = sum_k beta_k (W_k h + b_k), so per-example betas are exact in a batch."""

    def __init__(self, linears, mixture: Mixture):
        super().__init__()
        self.linears, self.mixture = nn.ModuleList(linears), mixture

    def forward(self, x):
        slots, beta = self.mixture.slots, self.mixture.beta
        if beta is None:
            return self.linears[slots[0]](x)
        outs = torch.stack([self.linears[k](x) for k in slots], dim=-1)  # (..., out, S)
        if beta.dim() == 2:  # (B, S) -> (B, 1, ..., 1, S)
            beta = beta.view(beta.size(0), *([1] * (x.dim() - 1)), beta.size(1))
        return (outs * beta.to(outs)).sum(-1)


class BottleneckAdapter(nn.Module):
    """h + W_up act(W_down h + b_down) + b_up (Houlsby et al., 2019); the nonlinearity acts on the *mixed* down-
    projection, so a mix of slots is the adapter with mixed weights, not an ensemble of adapters."""

    def __init__(self, hidden, bottleneck, n_slots, mixture, activation):
        super().__init__()
        downs = [nn.Linear(hidden, bottleneck) for _ in range(n_slots)]
        ups = [nn.Linear(bottleneck, hidden) for _ in range(n_slots)]
        for down, up in zip(downs, ups):
            nn.init.normal_(down.weight, std=ADAPTER_INIT_STD), nn.init.zeros_(down.bias)
            nn.init.zeros_(up.weight), nn.init.zeros_(up.bias)
        self.down, self.act, self.up = MixedLinear(downs, mixture), ACTIVATIONS[activation](), MixedLinear(ups, mixture)

    def forward(self, h):
        return h + self.up(self.act(self.down(h)))


def head_layers(model):
    """(owner, attribute) of the head's linear maps, copied per slot: BERT's pooler dense and classifier, or RoBERTa's
    dense and out_proj (deviation 5)."""
    if getattr(getattr(model, "bert", None), "pooler", None) is not None:
        return [(model.bert.pooler, "dense"), (model, "classifier")]
    if hasattr(getattr(model, "classifier", None), "out_proj"):
        return [(model.classifier, "dense"), (model.classifier, "out_proj")]
    raise UsageError(f"--model {type(model).__name__}: only BERT/RoBERTa-style classifiers are supported")


def add_adapters(model, n_slots, adapter_type, reduction_factor, activation) -> Mixture:
    """Freeze theta_0; n_slots equal adapter sets after the sub-layers' output projections and n_slots heads (§3.2)."""
    model.requires_grad_(False)
    mixture, hidden = Mixture(), model.config.hidden_size
    layers = getattr(getattr(model.base_model, "encoder", None), "layer", None)
    if layers is None:
        raise UsageError(f"--model {type(model).__name__}: no encoder.layer list to insert adapters into")
    for layer in layers:
        for spot in [layer.output] if adapter_type == "pfeiffer" else [layer.attention.output, layer.output]:
            adapter = BottleneckAdapter(hidden, max(1, hidden // reduction_factor), n_slots, mixture, activation)
            spot.dense = nn.Sequential(spot.dense, adapter)
    for owner, name in head_layers(model):
        base = getattr(owner, name)
        setattr(owner, name, MixedLinear([copy.deepcopy(base).requires_grad_(True) for _ in range(n_slots)], mixture))
    for k in range(1, n_slots):
        load_adapter_state(model, k, adapter_state(model, 0))
    return mixture


def mixed_linears(model):
    return [m for m in model.modules() if isinstance(m, MixedLinear)]


def adapter_params(model, k):
    return [p for m in mixed_linears(model) for p in m.linears[k].parameters()]


def train_only(model, k):
    """Only adapter slot k (adapters + head) receives gradients; theta_0 and the other slots stay frozen."""
    for m in mixed_linears(model):
        for i, linear in enumerate(m.linears):
            linear.requires_grad_(i == k)


def adapter_state(model, k) -> dict:
    return {f"{i}.{n}": p.detach().cpu().clone() for i, m in enumerate(mixed_linears(model))
            for n, p in m.linears[k].named_parameters()}


def load_adapter_state(model, k, state):  # the keys of adapter_state: "{i}.{name}" of slot k's i-th linear map
    nn.ModuleList(m.linears[k] for m in mixed_linears(model)).load_state_dict(state)


@torch.no_grad()
def merge_adapters(model, slots, beta, dst):
    """phi_mix = sum_k beta_k phi_k, tensor by tensor, adapters and heads (spec §3.5), written into slot dst."""
    for m in mixed_linears(model):
        for name, p_dst in m.linears[dst].named_parameters():
            p_dst.copy_(sum(b * dict(m.linears[k].named_parameters())[name] for k, b in zip(slots, beta)))


@torch.no_grad()
def reinit_adapter(model, k, seed):
    """Slot k's W_down and classifier drawn afresh under `seed`: no random draw shared with phi_0 (deviation 14)."""
    gen, classifier = torch.Generator().manual_seed(seed), mixed_linears(model)[-1].linears[k]
    downs = [(m.down.linears[k].weight, ADAPTER_INIT_STD) for m in model.modules() if isinstance(m, BottleneckAdapter)]
    for weight, std in downs + [(classifier.weight, model.config.initializer_range)]:
        weight.copy_(torch.randn(weight.shape, generator=gen) * std)
    classifier.bias.zero_()


# ---- The predictor: list[str] -> logits, beta included, so attacks query the whole defence (spec §3.7) ---------------
def dynamic_beta(entropies, rule="inverse-entropy", temperature=1.0, head_start=0.0):
    """(B, S) prediction entropies H_k -> (B, S) coefficients on the simplex (spec §3.6); column 0, the clean adapter,
    gets the head start b (deviation 3: without it, adapters close to phi_0 give the uniform soup on every input)."""
    if rule == "inverse-entropy":  # variant A: s_k = 1/(H_k + eps), beta_k = s_k / sum_j s_j
        scores = 1.0 / (entropies + ENTROPY_EPS)
        scores = torch.cat([scores[:, :1] * (1.0 + head_start), scores[:, 1:]], 1)
        return scores / scores.sum(-1, keepdim=True)
    return F.softmax(torch.cat([head_start - entropies[:, :1], -entropies[:, 1:]], 1) / temperature, -1)


class MixupPredictor(attacks.MixingPredictor):
    """beta None: adapter slot slots[0] alone (a fixed mix is merged into a slot first); 'dynamic': beta(x) from the
    entropies of the S single-slot predictions (S passes batched by repeating the batch, plus the mixed pass);
    'ensemble': the control that mixes outputs, not weights: the mean of the S single slots' probabilities."""

    def __init__(self, model, tokenizer, mixture, slots, beta, args, device, autocast, rule="inverse-entropy"):
        super().__init__(model, tokenizer, args.max_seq_length, args.eval_batch_size, device, autocast)
        self.mixture, self.slots, self.beta, self.args, self.rule = mixture, slots, beta, args, rule
        self.candidates = torch.eye(len(slots))  # one pass each when mixing: one-hot, each slot alone
        if rule == "min-entropy" and beta != "ensemble":  # variant B's candidates: the simplex grid, v1's step
            n = round(1 / args.beta_grid_step)
            grid = [c for c in itertools.product(range(n + 1), repeat=len(slots)) if sum(c) == n]
            self.candidates = torch.tensor(grid, dtype=torch.float32) / n
        self.passes = len(self.candidates) + (rule != "min-entropy" and beta == "dynamic") if beta else 1  # + v2's mix

    def mix(self, enc):
        """(logits, beta) for one tokenised batch (in eval mode, no gradients: MixingPredictor.run)."""
        batch = enc["input_ids"].size(0)
        if self.beta not in ("dynamic", "ensemble"):
            self.mixture.use(self.slots)
            return self.logits(enc), torch.ones(batch, 1)
        grid = self.candidates.size(0)  # copy g of the batch uses candidate mix g (one-hot = single adapter)
        self.mixture.use(self.slots, self.candidates.repeat_interleave(batch, 0).to(self.device))
        logits = self.logits({k: v.repeat(grid, 1) for k, v in enc.items()}).view(grid, batch, -1)
        if self.beta == "ensemble":  # log of the mean probability: argmax and attacks see the averaged output
            return torch.logsumexp(F.log_softmax(logits, -1), 0) - math.log(grid), torch.full((batch, grid), 1 / grid)
        entropies = -(F.softmax(logits, -1) * F.log_softmax(logits, -1)).sum(-1).T  # (B, G) prediction entropies H
        if self.rule == "min-entropy":  # variant B: the grid point whose mixed model is most confident
            pick = entropies.argmin(1)
            return logits[pick, torch.arange(batch)], self.candidates[pick.cpu()]
        beta = dynamic_beta(entropies, self.rule, self.args.temperature, self.args.head_start)
        self.mixture.use(self.slots, beta)
        return self.logits(enc), beta.cpu()


def train_adapter(model, mixture, k, train_rows, dev_rows, data, tokenizer, run, args, epochs, lr, tag, seed=None):
    """Train adapter slot k (backbone frozen) on (text, label) rows; keep its best state on dev_rows."""
    set_seed(args.seed if seed is None else seed)  # each slot trains the same whether earlier stages were cached
    mixture.use([k])
    train_only(model, k)
    stats = attacks.finetune_rows(model, tokenizer, data, train_rows, dev_rows, run, args, epochs, lr, tag, seed,
                                  params=adapter_params(model, k))
    train_only(model, -1)
    return stats


def trainable_share(model, backbone_total) -> dict:
    """One slot's trainable parameters (adapters + head) as a share of the backbone, also without the pooler dense."""
    pooler = sum(p.numel() for p in mixed_linears(model)[-2].linears[0].parameters())  # head_layers' first map
    per_adapter = sum(p.numel() for p in adapter_params(model, 0))
    return {"per_adapter": per_adapter, "pooler": pooler, "pct_of_backbone": 100 * per_adapter / backbone_total,
            "pct_without_pooler": 100 * (per_adapter - pooler) / backbone_total, "includes": "adapters + pooler + head"}


# ---- The stages of the algorithm (spec §3.8); main() at the end calls them in order ----------------------------------
class Experiment:
    """What the stages share: run, (text, label) rows, the model with one adapter slot per predictor, the results."""

    def __init__(self, args, resources):
        self.args, self.run = args, start_run(args, METHOD, also_attacks=args.known, resume=args.resume,
                                              free=("resume", "attack_workers", "attacks"))  # the training attacks too
        self.resources, self.data = attacks.attack_resources(args, resources), load_task(args)  # built once
        self.model, self.tokenizer = load_model(args.model, self.data.num_labels, args.max_seq_length,
                                                os.path.join(args.output_dir, ".tiny-bert"))
        self.backbone = count_params(self.model)
        names = ["clean"] + [f"adv-{a}" for a in args.known] + ["at", "soup", "v1", "curve"] + (
            ["independent"] if args.transfer_source == "independent" else [])  # last: the others keep their indices
        self.adapter_slots = {name: i for i, name in enumerate(names)}
        self.mixture = add_adapters(self.model, len(self.adapter_slots), args.adapter_type, args.reduction_factor,
                                    args.adapter_activation)
        self.model.to(self.run.device)
        self.results = results_template(args, METHOD, "adpmixup", None)
        self.wall, self.warnings = self.results["wall_clock"], []
        self.extra = self.run.extra = self.results["extra"]  # the diagnostics, in the partial results.json as they come
        self.train_rows, self.dev_rows, self.test_rows = [list(zip(texts_of(self.data, ds), ds["label"])) for ds in
                                                          (self.data.train, self.data.dev, self.data.test)]
        share = self.extra["trainable_share"] = trainable_share(self.model, self.backbone["total"])
        print(f"[{METHOD}] backbone {self.backbone['total']:,} params (frozen); one adapter set + head "
              f"{share['per_adapter']:,} ({share['pct_of_backbone']:.2f}% of the backbone, incl. the pooler dense "
              f"{share['pooler']:,}; {share['pct_without_pooler']:.2f}% without)", flush=True)

    def predictor(self, names, beta=None):
        return MixupPredictor(self.model, self.tokenizer, self.mixture, [self.adapter_slots[n] for n in names], beta,
                              self.args, self.run.device, self.run.autocast, self.args.dynamic_rule)

    def train(self, name, train_rows, dev_rows, epochs, lr, tag, seed=None):
        return train_adapter(self.model, self.mixture, self.adapter_slots[name], train_rows, dev_rows, self.data,
                             self.tokenizer, self.run, self.args, epochs, lr, tag, seed)

    def weights_id(self, name):
        return fingerprint_tensors(adapter_state(self.model, self.adapter_slots[name]))

    def dev_robust(self, names, predict, n) -> dict:
        """{recipe: robust or not, per sentence} of n seeded dev sentences, each recipe run afresh on `predict`."""
        return {name: attacks.attack_seeded_rows(predict, name, self.dev_rows, n, self.args, self.run, self.resources,
                                                 self.data.text_columns, "dev") for name in names}


def clean_adapter(ex, name, seed):
    """Stage 1: a clean adapter on D_tr under `seed`, best on dev (spec §3.4 step 1); from the cache if trained."""
    args, k = ex.args, ex.adapter_slots[name]
    config = {key: getattr(args, key) for key in CLEAN_KEY} | {"device": ex.run.device.type, "version": CACHE_VERSION}
    if name != "clean":  # the independent transfer source: drawn afresh (its own initialisation) and seeded apart
        config |= {"seed": seed, "role": name}
        reinit_adapter(ex.model, k, seed)
    config["init"] = ex.weights_id(name)  # the initial weights depend on the number of slots the model holds
    return attacks.cached_training(args.cache_dir, "clean", config, f"[stage 1] {name} adapter", lambda: (
        ex.train(name, ex.train_rows, ex.dev_rows, args.epochs, args.lr, f"{name}_adapter", seed),
        adapter_state(ex.model, k)), lambda state: load_adapter_state(ex.model, k, state))


def adversarial_data(ex, rng):
    """Stage 2: D_adv,k = successful attacks a_k on phi_0 over a seeded train subset, gold labels kept (spec §3.3),
    10 % held out as adv_val; the test transfer sets made against the independent clean adapter (deviation 14), else
    None (phi_0's own attacks, read in stage 6). Returns (adv_train, adv_val, transfer) by attack."""
    args, n = ex.args, min(ex.args.adv_train_examples, len(ex.train_rows))
    samples = [ex.train_rows[i] for i in np.sort(rng.choice(len(ex.train_rows), size=n, replace=False))]
    adv_train, adv_val, ex.extra["adversarial_data"], ex.wall["adversarial_generation"] = {}, {}, {}, 0.0
    for name in args.known:  # cached by the attacked weights, the sample and the attack's settings
        summary, kept = attacks.adversarial_rows("adv", name, ex.predictor(["clean"]), ex.weights_id("clean"), samples,
                                                 ex.data.text_columns, args.cache_dir, args, ex.resources,
                                                 CACHE_VERSION, "the clean adapter")
        ex.extra["adversarial_data"][name] = summary
        ex.wall["adversarial_generation"] += summary["seconds"]
        if not kept:
            ex.warnings.append(f"no {name} attack succeeded on the {summary['attacked']} attacked training examples; "
                               f"no adversarial adapter for {name}")
            print(f"warning: {ex.warnings[-1]}", flush=True)
            continue
        order = np.random.default_rng(args.seed).permutation(len(kept))
        n_val = max(int(len(kept) > 1), round(ADV_VAL_SHARE * len(kept)))  # one at least, from two rows on
        adv_train[name], adv_val[name] = [kept[i] for i in order[n_val:]], [kept[i] for i in order[:n_val]]
        summary.update(kept_train=len(adv_train[name]), kept_val=len(adv_val[name]))
    ex.extra["transfer_source"] = {"source": "clean", "note": "made against phi_0: it scores 0 on them by construction"}
    if args.transfer_source != "independent":
        return adv_train, adv_val, None
    source, weights = ex.predictor(["independent"]), ex.weights_id("independent")
    ex.extra["transfer_source"] = {"source": "independent", "seed": args.seed + INDEPENDENT_SEED_OFFSET,
                                   "adapter": weights, "clean_adapter": ex.weights_id("clean"), "sets": {},
                                   "dev_accuracy": rows_accuracy(source, ex.dev_rows)}
    ex.extra["transfer_source"]["sets"], transfer = attacks.transfer_rows(
        source, weights, ex.data, args.cache_dir, args, ex.resources, CACHE_VERSION, "the independent adapter")
    return adv_train, adv_val, transfer


def adversarial_adapters(ex, rng, adv_train, adv_val):
    """Stage 3: phi_k from phi_0 on D_adv,k + as many clean rows (spec §3.4 step 2), the gate, the AT adapter."""
    args, stats, ex.wall["adversarial_adapters"] = ex.args, {}, 0.0
    for name in adv_train:
        load_adapter_state(ex.model, ex.adapter_slots[f"adv-{name}"], adapter_state(ex.model, 0))
        n = len(adv_train[name])
        clean_sample = [ex.train_rows[i] for i in rng.choice(len(ex.train_rows), n, replace=False)] \
            if n <= len(ex.train_rows) else ex.train_rows
        # selected on dev and adv-val weighted equally: adv-val repeated to dev's size (it is ~10x smaller)
        balanced = ex.dev_rows + adv_val[name] * max(1, round(len(ex.dev_rows) / max(1, len(adv_val[name]))))
        stats[f"adv-{name}"] = ex.train(f"adv-{name}", adv_train[name] + clean_sample, balanced, args.adv_epochs,
                                        args.adv_lr, f"adv_adapter_{name}")
        ex.wall["adversarial_adapters"] += stats[f"adv-{name}"]["seconds"]
    if args.gate_examples:
        ex.extra["gate"] = {name: adapter_gate(ex, name) for name in adv_train}
    if adv_train:  # adversarial training on D_tr ∪ all D_adv,k from phi_0's initialisation, still in its unused slot
        at_train, at_dev = ex.train_rows + sum(adv_train.values(), []), ex.dev_rows + sum(adv_val.values(), [])
        stats["at"] = ex.train("at", at_train, at_dev, args.epochs, args.lr, "at_adapter")
        ex.wall["at_adapter"] = stats["at"]["seconds"]
    states = {s: adapter_state(ex.model, i) for s, i in ex.adapter_slots.items()}  # every slot, in slot order
    torch.save({"slots": list(states), "args": vars(args), "state": states}, os.path.join(ex.run.dir, "adapters.pt"))
    return stats


def adapter_gate(ex, name) -> dict:
    """Does phi_k resist a_k better than phi_0 on the same dev sentences, beyond the paired interval? (deviation 6)"""
    gate = attacks.robustness_gain({who: ex.dev_robust([name], ex.predictor([slot]), ex.args.gate_examples)[name]
                                    for who, slot in (("clean", "clean"), ("adversarial", f"adv-{name}"))},
                                   seed=ex.args.attack_seed)
    verdict = f"{gate['delta']:+.1f} [{gate['ci'][0]:+.1f}, {gate['ci'][1]:+.1f}]"
    print(f"[gate {name}] dev Aua under {name}: phi_0 {gate['aua_clean']:.1f}% vs adversarial adapter "
          f"{gate['aua_adversarial']:.1f}% (n={gate['n']}): {verdict} -> "
          f"{'passed' if gate['passed'] else 'NOT passed'}", flush=True)
    if not gate["passed"]:
        ex.warnings.append(f"the {name} adversarial adapter is not more robust than the clean adapter under {name} "
                           f"on dev beyond the paired interval ({verdict} points, n={gate['n']}): "
                           f"mixing it in cannot be expected to help")
    return gate


def choose_v1(ex, known, adv_val):
    """Stage 4: the beta curve phi_mix(beta) = beta phi_0 + (1 - beta)/m sum_k phi_k on the grid (spec §3.5); v1's beta
    (fixed, or the best grid point on dev) merged into slot v1, the uniform soup into slot soup. Returns beta_v1."""
    args, slots = ex.args, [ex.adapter_slots[s] for s in ["clean"] + [f"adv-{a}" for a in known]]
    spread = lambda beta: [beta] + [(1 - beta) / len(known)] * len(known)  # noqa: E731  the rest shared equally
    adv_val_rows, curve = sum(adv_val.values(), []), []
    for beta in np.round(np.arange(0, 1 + 1e-9, args.beta_grid_step), 6).tolist() if known else []:
        merge_adapters(ex.model, slots, spread(beta), ex.adapter_slots["curve"])
        predict = ex.predictor(["curve"])
        point = {"beta": beta, "dev_clean": rows_accuracy(predict, ex.dev_rows),
                 "adv_val": rows_accuracy(predict, adv_val_rows), "test_clean": rows_accuracy(predict, ex.test_rows)}
        point["objective"] = point["dev_clean"] if not adv_val_rows else (point["dev_clean"] + point["adv_val"]) / 2
        if args.beta_attack_examples:  # the adaptive objective: the known attacks afresh on dev, at this beta
            robust = ex.dev_robust(known, predict, args.beta_attack_examples)
            point.update(attacks.adaptive_objective(point["dev_clean"], robust))
        if args.curve_attack_examples and parse_attacks(args.attacks):
            point.update(attacks.aua_on(predict, ex.data, args, ex.run, f"curve{beta:g}_", ex.resources,
                                        args.curve_attack_examples))
        curve.append(point)
        ex.run.log({f"charts/beta_curve_{k}": v for k, v in point.items() if k != "beta"}, int(round(beta * 100)))
        print(f"[stage 4] beta {beta:.2f}: " + "  ".join(f"{k} {v:.1f}" for k, v in point.items() if k != "beta"),
              flush=True)
    key = "adaptive_objective" if args.beta_attack_examples else "objective"
    best = max(curve, key=lambda point: (point[key], point["beta"]))["beta"] if curve else 1.0  # ties: more clean
    beta_v1 = args.beta if isinstance(args.beta, float) else best
    if known:
        merge_adapters(ex.model, slots, spread(beta_v1), ex.adapter_slots["v1"])
        merge_adapters(ex.model, slots, [1 / len(slots)] * len(slots), ex.adapter_slots["soup"])
    ex.extra["beta_curve"] = {"points": curve, "csv": "beta_curve.csv"}  # plotted by report.py
    attacks.write_csv(os.path.join(ex.run.dir, "beta_curve.csv"), curve)  # none without a known attack
    return beta_v1


def tune_v2(ex, known):
    """Stage 5: v2's tau and clean head start b, tried on the adaptive dev objective (spec §3.6); set in args."""
    tried, mix = [], ["clean"] + [f"adv-{a}" for a in known]
    for tau, head in ex.args.v2_pairs:
        ex.args.temperature, ex.args.head_start = tau, head
        v2 = ex.predictor(mix, "dynamic")
        tried.append({"tau": tau, "head_start": head, **attacks.adaptive_objective(
            rows_accuracy(v2, ex.dev_rows), ex.dev_robust(known, v2, ex.args.beta_attack_examples))})
        print(f"[stage 5] v2 tau {tau:g} head start {head:g}: objective {tried[-1]['adaptive_objective']:.1f}",
              flush=True)
    pick = max(tried, key=lambda t: (t["adaptive_objective"], t["head_start"]))  # ties: more clean
    ex.args.temperature, ex.args.head_start = pick["tau"], pick["head_start"]
    ex.extra["v2_tuning"] = {"tried": tried, "tau": pick["tau"], "head_start": pick["head_start"]}


def evaluate_rows(ex, known, beta_v1, adv_train, adv_val, transfer_rows):
    """Stage 6: every predictor attacked as a whole (spec §7) and scored on the transfer sets (phi_0's own successful
    attacks unless given); v2 profiled; the full-AT baseline on the same clean + adversarial rows. Returns the rows."""
    args, mix = ex.args, ["clean"] + [f"adv-{a}" for a in known]
    generation, mixing = ["clean_adapter", "adversarial_generation"], ["adversarial_adapters"]
    specs = [("clean", "clean adapter", ex.predictor(["clean"]), ["clean_adapter"])]
    specs += [(f"adv-{a}", f"adv adapter ({a})", ex.predictor([f"adv-{a}"]), generation + mixing) for a in known]
    if known:
        specs += [("at", "AT adapter (clean+adv)", ex.predictor(["at"]), generation + ["at_adapter"]),
                  ("soup", f"soup (beta={1 / len(mix):.2f})", ex.predictor(["soup"]), generation + mixing),
                  ("ensemble", "output ensemble (control)", ex.predictor(mix, "ensemble"), generation + mixing),
                  ("v1", f"AdpMixup v1 (beta={beta_v1:g})", ex.predictor(["v1"]), generation + mixing),
                  ("v2", f"AdpMixup v2 ({args.dynamic_rule})", ex.predictor(mix, "dynamic"), generation + mixing)]
    share, rows, attacked = ex.extra["trainable_share"], [], {}  # attacked: weights fingerprint -> (row, attacks)
    for key, setting, predict, cost in specs:
        start, stored = time.time(), len(mix) if key in ("soup", "v1", "v2", "ensemble") else 1
        row = {"key": key, "setting": setting, "passes_per_example": predict.passes, "params": {
            "trainable": stored * share["per_adapter"], "total": ex.backbone["total"] + stored * share["per_adapter"],
            **{f"trainable_{pct}": stored * share[pct] for pct in ("pct_of_backbone", "pct_without_pooler")}}}
        # v1 at a grid end or at 1/(m+1) is another row's weights; v2 and the ensemble mix per input (no weights)
        weights = ex.weights_id(key) if key in ex.adapter_slots else None
        transfer_rows = attacks.evaluate_row(row, predict, args, ex.run, ex.data, ex.resources, ex.dev_rows,
                                             ex.test_rows, known, transfer_rows, attacked, weights)
        row["wall_clock"] = {**{c: ex.wall.get(c, 0.0) for c in cost}, "evaluation": time.time() - start}
        rows.append(row)
    if known:  # v2's weights on the transfer sets, or on adv-val where none were made (a pair task, no --attacks)
        source = "test transfer sets" if transfer_rows else "train-side adversarial validation"
        ex.extra["profiling"] = attacks.mixing_profile(ex.predictor(mix, "dynamic"), mix, [t for t, _ in ex.test_rows],
                                                       transfer_rows or adv_val, source)
    if args.baseline == "full-at":  # the whole backbone trained on the AT adapter's clean + adversarial rows
        row, ex.wall["full_at"] = attacks.full_at_row(
            args, ex.data, ex.run, ex.resources, ex.train_rows + sum(adv_train.values(), []),
            ex.dev_rows + sum(adv_val.values(), []), ex.dev_rows, known, transfer_rows,
            {c: ex.wall[c] for c in generation})
        rows.append(row)
    return rows


# ---- Main: the algorithm (spec §3.8) in six stages -------------------------------------------------------------------
def main(args, resources=None):
    validate(args)
    if args.bench:  # training cost vs full AT, inference passes; exit
        return bench.bench_adapter_mixup(args)
    ex = Experiment(args, resources)

    print("=== Stage 1: clean adapter ===", flush=True)  # phi_0 (and the independent transfer source) on D_tr (§3.4)
    train_stats = {"clean": clean_adapter(ex, "clean", args.seed)}
    ex.wall["clean_adapter"] = train_stats["clean"]["seconds"]
    if args.transfer_source == "independent":
        train_stats["independent"] = clean_adapter(ex, "independent", args.seed + INDEPENDENT_SEED_OFFSET)

    print("=== Stage 2: adversarial data ===", flush=True)  # D_adv,k: successful attacks a_k on phi_0 (spec §3.3)
    rng = np.random.default_rng(args.seed)
    adv_train, adv_val, transfer_rows = adversarial_data(ex, rng)  # transfer_rows None: phi_0's own, in stage 6
    known = list(adv_train)  # attacks that have an adversarial adapter

    print("=== Stage 3: adversarial adapters ===", flush=True)  # phi_k from phi_0 (spec §3.4 step 2), gate, AT
    train_stats.update(adversarial_adapters(ex, rng, adv_train, adv_val))

    print("=== Stage 4: mixing (v1) ===", flush=True)  # one beta in weight space, on the grid (spec §3.5)
    beta_v1 = ex.extra["beta_v1"] = choose_v1(ex, known, adv_val)

    if known and args.v2_pairs:  # v2: beta per input from the entropies (spec §3.6)
        print("=== Stage 5: v2 tuning ===", flush=True)
        tune_v2(ex, known)

    print("=== Stage 6: evaluation ===", flush=True)  # every predictor attacked as a whole (spec §7)
    rows = evaluate_rows(ex, known, beta_v1, adv_train, adv_val, transfer_rows)

    # results.json: the main row on top (v2 for --beta dynamic, else v1; clean if no attack is known), all in extra
    main_row = next(r for r in rows if r["key"] == (("v2" if args.beta == "dynamic" else "v1") if known else "clean"))
    ex.extra.update(rows=rows, beta_v1=beta_v1, known_attacks=known, unknown_attacks=[
        a for a in parse_attacks(args.attacks) if a not in known], training=train_stats, warnings=ex.warnings,
        per_adapter_set_params=ex.extra["trainable_share"]["per_adapter"], backbone_params=ex.backbone, adapter=dict(
            type=args.adapter_type, reduction_factor=args.reduction_factor, activation=args.adapter_activation))
    return attacks.finish_rows(ex.run, ex.results, rows, main_row,
                               ex.backbone["non_embedding"] + main_row["params"]["trainable"], ex.warnings)


if __name__ == "__main__":
    with usage_errors():
        main(parse_args())
