# EarlyRobust: Efficient Adversarial Training with Robust Early-Bird Tickets (EMNLP 2022, arXiv 2211.07263)
# Stage 1 FreeLB search of the model + slimming gates (heads, FFN neurons) with L1, stopped online when the masks
# converge; Stage 2 draw, rewind to the pre-trained weights, prune physically; Stage 3 plain fine-tuning of the ticket.
# Usage, logged metrics, numbered deviations, the speed-up's cost model and results: docs/early_bird_adv.md.
import argparse
import json
import math
import os
import time
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import prune_linear_layer

from attacks import evaluate_model, print_summary
from common import (UsageError, add_adversary_args, add_common_args, adversarial_backward, adversary_from_args,
                    check_range, count_params, cross_entropy, finetune, finish_run, linear_schedule, load_model,
                    load_task, make_loader, results_template, set_seed, start_run, state_copy, tokenize, usage_errors,
                    validate_common_args, write_json_atomic)

METHOD = "early_bird_adv"
SETTINGS = {"ticket": "early-bird ticket", "freelb": "FreeLB", "finetune": "fine-tune"}
GATE_INIT = 1.0  # slimming coefficients start at 1 (network slimming; official code)
GRAD_CLIP = 1.0
THROUGHPUT_REPEATS = 3  # passes over the test split when timing inference


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="EarlyRobust: FreeLB search of a structured ticket with an "
                                "online convergence stop, then plain fine-tuning of the pruned network")
    add_common_args(p, METHOD, lr=2e-5, epochs=3, attacks="textfooler,bert-attack,textbugger")
    # stage 3 (and the baselines) use the released second stage's optimiser: AdamW wd 0, no warm-up
    p.set_defaults(weight_decay=0.0, warmup=0.0)
    add_adversary_args(p, steps=5, lr=0.01, init_mag=0.05, max_norm=0.0)  # released IMDB search script
    m = p.add_argument_group("EarlyRobust")
    m.add_argument("--l1-head", type=float, default=1e-5, help="L1 weight on head gates (lambda_head; released 1e-5)")
    m.add_argument("--l1-ffn", type=float, default=2e-4, help="L1 weight on the FFN-neuron gates (lambda_ffn; 2e-4)")
    m.add_argument("--search-lr", type=float, default=2e-5, help="AdamW lr of the FreeLB search (model + gates)")
    m.add_argument("--search-weight-decay", type=float, default=0.01, help="AdamW weight decay of the search")
    m.add_argument("--search-warmup", type=float, default=0.1, help="warm-up share of the search schedule")
    m.add_argument("--search-epochs", type=float, default=1.0,
                   help="length of the search's lr schedule in epochs (official: 1); the stop never changes it")
    m.add_argument("--max-search-epochs", type=float, default=1.0,
                   help="cap of the search (<= --search-epochs): where it stops if the masks never converge")
    m.add_argument("--prune-heads", type=float, default=0.1667, help="share of heads pruned (p_head; released 1/6)")
    m.add_argument("--prune-ffn", type=float, default=0.4, help="share of FFN neurons pruned, global (p_ffn; 0.4)")
    m.add_argument("--head-scope", choices=["global", "layer"], default="global",
                   help="heads ranked over the whole model (>= 1 kept per layer) or within each layer")
    m.add_argument("--check-every", type=float, default=0.05, help="epochs between mask checkpoints (official 0.05)")
    m.add_argument("--epsilon", type=float, default=0.1,
                   help="ticket convergence threshold on the normalised Hamming distance (paper: unknown; "
                        "Early-Bird 0.1)")
    m.add_argument("--window", type=int, default=5, help="number of later checkpoints a mask must stay within "
                   "epsilon of (official 5)")
    m.add_argument("--draw-at", type=float, default=None, help="draw at this epoch instead of the convergence rule "
                   "(the released IMDB run: 0.2)")
    m.add_argument("--ticket-from", metavar="JSON", default=None, help="skip the search: the ticket drawn by an "
                   "earlier search (its bench.json, or a ticket/ticket.json), rewound, pruned and fine-tuned here")
    m.add_argument("--rewind", action=argparse.BooleanOptionalAction, default=True,
                   help="prune the pre-trained weights (paper); --no-rewind keeps the searched weights and gates")
    m.add_argument("--finetune-adv", action="store_true", help="fine-tune the ticket with FreeLB instead of plain CE")
    m.add_argument("--baseline", choices=["freelb", "finetune"], default=None,
                   help="train only the dense baseline: full FreeLB, or plain fine-tuning, same budget (--epochs)")
    m.add_argument("--with-baselines", action="store_true", help="also train both dense baselines in this process "
                   "(timed side by side; gives the speed-up) and add them to extra.rows")
    m.add_argument("--baseline-results", default=None, help="results.json of a --baseline freelb run: speed-up "
                   "against its fine-tune wall-clock")
    m.add_argument("--bench", action="store_true", help="print time-to-ticket vs FreeLB steps and ticket vs dense "
                   "inference, then exit")
    m.add_argument("--bench-steps", type=int, default=10, help="training steps timed per model in --bench")
    return p.parse_args(argv)


def validate_args(args):
    validate_common_args(args)
    check_range("prune-heads", args.prune_heads, 0, 1, high_open=True)
    check_range("prune-ffn", args.prune_ffn, 0, 1, high_open=True)
    check_range("epsilon", args.epsilon, 0, 1, low_open=True)
    check_range("window", args.window, 1)
    check_range("check-every", args.check_every, 0, 1, low_open=True)
    check_range("search-epochs", args.search_epochs, 0, low_open=True)
    check_range("max-search-epochs", args.max_search_epochs, 0, args.search_epochs, low_open=True)
    for name in ("l1_head", "l1_ffn", "search_weight_decay"):
        check_range(name.replace("_", "-"), getattr(args, name), 0)
    check_range("search-lr", args.search_lr, 0, low_open=True)
    check_range("search-warmup", args.search_warmup, 0, 1)
    check_range("bench-steps", args.bench_steps, 1)
    if args.draw_at is not None:
        check_range("draw-at", args.draw_at, 0, args.max_search_epochs, low_open=True)
    if args.baseline_results:
        check_baseline(args)
    if args.ticket_from is not None and args.bench:
        raise UsageError("--bench runs its own search: drop --ticket-from")
    if args.ticket_from is not None and not args.rewind:
        raise UsageError("--ticket-from keeps only the drawn structure: it needs --rewind (the searched weights "
                         "are not in the file)")
    if args.ticket_from is not None and not os.path.isfile(args.ticket_from):
        raise UsageError(f"--ticket-from {args.ticket_from}: no such file (a bench.json or ticket.json)")


BASELINE_MUST_MATCH = ("task", "model", "data_dir", "max_train_examples", "dev_size", "max_seq_length", "batch_size",
                       "epochs", "adv_steps")  # data, model, budget, K


def check_baseline(args):
    """--baseline-results must be a FreeLB run on the same data, model, budget (epochs) and K as this ticket run's
    search and fine-tuning, or the speed-up compares unlike things (its args.json sits beside results.json)."""
    flags = os.path.join(os.path.dirname(args.baseline_results), "args.json")
    if not os.path.isfile(args.baseline_results) or not os.path.isfile(flags):
        raise UsageError(f"--baseline-results {args.baseline_results}: not a run's results.json (with args.json "
                         f"beside it); give the results.json of a FreeLB run")
    with open(flags) as f:
        theirs = json.load(f)
    if theirs.get("adv_steps", 0) <= 0:
        raise UsageError(f"--baseline-results {args.baseline_results} is not a FreeLB run (adv_steps 0)")
    differ = differing(args, theirs, BASELINE_MUST_MATCH)
    if differ:
        raise UsageError(f"--baseline-results {args.baseline_results} differs from this run: {'; '.join(differ)}")


def differing(args, theirs: dict, keys) -> list:
    """'flag theirs vs mine' for each key whose value differs (local paths compared by their real path)."""
    def same(k):
        mine, other = getattr(args, k), theirs.get(k)
        if k in ("model", "data_dir") and isinstance(other, str) and isinstance(mine, str) and os.path.exists(mine):
            return os.path.realpath(mine) == os.path.realpath(other)
        return mine == other
    return [f"{k} {theirs.get(k)} vs {getattr(args, k)}" for k in keys if not same(k)]


def check_ratios_fit(config, args):
    """A head ratio that would empty a layer is a usage error (the >= 1-head guard cannot satisfy it)."""
    n_layers, n_heads = config.num_hidden_layers, config.num_attention_heads
    if args.head_scope == "layer" and round(args.prune_heads * n_heads) >= n_heads:
        raise UsageError(f"--prune-heads {args.prune_heads} removes all {n_heads} heads of every layer; use < "
                         f"{(n_heads - 0.5) / n_heads:.3f}")
    if round(args.prune_heads * n_layers * n_heads) > n_layers * (n_heads - 1):
        raise UsageError(f"--prune-heads {args.prune_heads} cannot keep one head in each of {n_layers} layers; "
                         f"use <= {(n_heads - 1) / n_heads:.3f}")


# ---------------------------------------------------------------------------------------------------------------
# Gates (spec §2.2; network slimming): c_head scales each head's attention probabilities, c_ffn each FFN neuron
# ---------------------------------------------------------------------------------------------------------------
class GatedBert(nn.Module):
    """model + learnable gates; forward(**inputs) -> model output. Needs eager attention (head_mask)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        layers = model.base_model.encoder.layer
        n_heads = model.config.num_attention_heads
        self.head_gates = nn.Parameter(torch.full((len(layers), n_heads), GATE_INIT))
        self.ffn_gates = nn.Parameter(torch.full((len(layers), layers[0].intermediate.dense.out_features), GATE_INIT))
        # FFN gate multiplies the post-GELU activation, i.e. the input of output.dense
        self.hooks = [layer.intermediate.register_forward_hook(lambda mod, inp, out, i=i: out * self.ffn_gates[i])
                      for i, layer in enumerate(layers)]

    def forward(self, **inputs):
        return self.model(**inputs, head_mask=self.head_gates)  # HF: attention_probs * head_mask[layer]

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def l1_penalty(self, l1_head, l1_ffn):
        """Network-slimming L1 term (spec §2.3): lambda_head * sum|c_head| + lambda_ffn * sum|c_ffn|."""
        return l1_head * self.head_gates.abs().sum() + l1_ffn * self.ffn_gates.abs().sum()

    def remove(self):
        for h in self.hooks:
            h.remove()
        return self.model


# ---------------------------------------------------------------------------------------------------------------
# Masks from gates (spec §2.6) and the ticket convergence metric with its stopping rule (spec §2.7)
# ---------------------------------------------------------------------------------------------------------------
def prune_lowest(values, ratio):
    """Keep-mask (bool, same shape) that prunes the round(ratio * n) smallest values (stable on ties)."""
    flat = values.reshape(-1)
    keep = np.ones(flat.size, dtype=bool)
    keep[np.argsort(flat, kind="stable")[: int(round(ratio * flat.size))]] = False
    return keep.reshape(values.shape)


def head_mask_from_gates(gates, ratio, scope="global"):
    """Heads with the smallest gates are pruned; global scope keeps at least one head per layer (official guard:
    protect the layer's largest gate and rank again until no layer is empty)."""
    if scope == "layer":
        return np.stack([prune_lowest(row, ratio) for row in gates])
    gates = np.array(gates, dtype=np.float64)
    while True:
        keep = prune_lowest(gates, ratio)
        empty = np.flatnonzero(~keep.any(1))
        if empty.size == 0:
            return keep
        gates[empty, gates[empty].argmax(1)] = np.inf


def ffn_mask_from_gates(gates, ratio):
    return prune_lowest(np.asarray(gates), ratio)  # global ranking over all layers, no per-layer minimum


def mask_distance(a, b):
    """Normalised Hamming distance between two binary masks (Early-Bird; EarlyRobust's convergence metric)."""
    return float(np.mean(np.asarray(a) != np.asarray(b)))


def window_converged(head_masks, ffn_masks, epsilon):
    """True when the oldest mask is within epsilon of every later one, for heads AND neurons; + the distances."""
    d_head = [mask_distance(head_masks[0], m) for m in head_masks[1:]]
    d_ffn = [mask_distance(ffn_masks[0], m) for m in ffn_masks[1:]]
    return max(d_head + d_ffn) < epsilon, d_head, d_ffn


def draw_index(head_masks, ffn_masks, epsilon, window):
    """First checkpoint g with d(g, g+k) < epsilon for k = 1..window (both unit types); None if none yet."""
    for g in range(len(head_masks) - window):
        if window_converged(head_masks[g: g + window + 1], ffn_masks[g: g + window + 1], epsilon)[0]:
            return g
    return None


# ---------------------------------------------------------------------------------------------------------------
# Physical pruning, FLOPs, save / load of a ticket with per-layer FFN widths
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def prune_model(model, head_keep, ffn_keep, head_scale=None, ffn_scale=None):
    """Remove pruned heads (Q/K/V rows, attention-output columns) and neurons (intermediate rows, output columns).
    Kept gate values (--no-rewind) are folded into the output projections, so no gate is needed afterwards."""
    layers = model.base_model.encoder.layer
    head_size = layers[0].attention.self.attention_head_size
    for i, layer in enumerate(layers):
        if head_scale is not None:  # context of head h is linear in its probabilities: scale its output columns
            scale = torch.as_tensor(head_scale[i], dtype=torch.float32).repeat_interleave(head_size)
            layer.attention.output.dense.weight.mul_(scale.to(layer.attention.output.dense.weight))
        if ffn_scale is not None:
            layer.output.dense.weight.mul_(torch.as_tensor(ffn_scale[i]).to(layer.output.dense.weight))
        index = torch.as_tensor(np.flatnonzero(ffn_keep[i]), device=layer.output.dense.weight.device)
        layer.intermediate.dense = prune_linear_layer(layer.intermediate.dense, index, dim=0)
        layer.output.dense = prune_linear_layer(layer.output.dense, index, dim=1)
    model.prune_heads({i: np.flatnonzero(~head_keep[i]).tolist() for i in range(len(layers)) if (~head_keep[i]).any()})
    return model


def flops_per_token(model, seq_len):
    """Analytic forward FLOPs per token of the encoder (2 x multiply-adds): Q,K,V,O projections, attention scores
    and weighted sum at sequence length seq_len, and the two FFN projections. Embeddings / pooler / head ignored."""
    total = 0
    for layer in model.base_model.encoder.layer:
        d, a = layer.attention.output.dense.out_features, layer.attention.self.all_head_size
        w = layer.intermediate.dense.out_features
        total += 2 * (4 * d * a + 2 * seq_len * a + 2 * d * w)
    return total


def save_ticket(model, tokenizer, folder, head_keep, ffn_keep):
    """config.json (HF re-prunes config.pruned_heads on load) + weights + ticket.json with the per-layer FFN
    widths a stock BertConfig cannot express. Reload with load_ticket(folder)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, "ticket.json"), "w") as f:
        json.dump(ticket_masks(head_keep, ffn_keep), f)


SEARCH_MUST_MATCH = ("task", "model", "data_dir", "dev_size", "max_seq_length", "batch_size", "adv_steps", "adv_lr",
                     "adv_init_mag", "adv_max_norm", "search_lr", "search_epochs", "max_search_epochs", "prune_heads",
                     "prune_ffn", "head_scope", "check_every", "epsilon", "window", "draw_at", "l1_head", "l1_ffn")


def drawn_ticket(path, config, args) -> dict:
    """--ticket-from: the masks (and, from a bench.json, the search's record) of an earlier search, checked
    against this model's shape and, where the source's args.json is found, against this run's search flags."""
    try:
        raw = json.load(open(path))
        if "search" in raw and "ticket" not in raw:
            raise KeyError("no 'ticket': a bench.json written before it stored the ticket; run that search again")
        masks, record = raw.get("ticket", raw), raw.get("search", {})
        head = np.array(masks["head_mask"], dtype=bool)
        kept = [np.asarray(k, dtype=int) for k in masks["ffn_kept_indices"]]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"--ticket-from {path}: not a bench.json or ticket.json ({type(e).__name__}: {e})")
    folder = os.path.dirname(os.path.abspath(path))  # a bench.json's run folder, or <run>/ticket
    source = next((p for p in (os.path.join(folder, "args.json"), os.path.join(os.path.dirname(folder), "args.json"))
                   if os.path.isfile(p)), None)
    if source is not None:
        theirs = json.load(open(source))
        differ = differing(args, theirs, [k for k in SEARCH_MUST_MATCH if k in theirs])
        if differ:
            raise UsageError(f"--ticket-from {path}: its search ran with other flags: {'; '.join(differ)}")
    n_layers, n_heads, width = config.num_hidden_layers, config.num_attention_heads, config.intermediate_size
    if head.shape != (n_layers, n_heads) or len(kept) != n_layers or any(
            k.size and (k.min() < 0 or k.max() >= width) for k in kept):
        raise UsageError(f"--ticket-from {path}: a head mask of shape {head.shape} and {len(kept)} FFN layers do not "
                         f"fit this {config.model_type} ({n_layers} layers x {n_heads} heads, FFN {width})")
    ffn = np.zeros((n_layers, width), dtype=bool)
    for i, k in enumerate(kept):
        ffn[i, k] = True
    curves = ("seconds", "checkpoints", "window_distances", "distance_matrix")  # stay in the source (one plot each)
    return {**{k: v for k, v in record.items() if k not in curves}, "head_keep": head, "ffn_keep": ffn,
            "ticket_from": args.ticket_from,
            "seconds": float(record.get("seconds") or 0.0)}  # counted in train time; 0 when the file has none


def ticket_masks(head_keep, ffn_keep) -> dict:
    """The drawn structure as JSON: per-layer widths, the 0/1 head mask and the kept FFN neurons of each layer."""
    return {"ffn_widths": [int(k.sum()) for k in ffn_keep], "heads_kept": [int(k.sum()) for k in head_keep],
            "head_mask": head_keep.astype(int).tolist(),
            "ffn_kept_indices": [np.flatnonzero(k).tolist() for k in ffn_keep]}


def load_ticket(folder):
    """(model, tokenizer) of a saved ticket: build the config's architecture, shrink each FFN, load the weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    with open(os.path.join(folder, "ticket.json")) as f:
        widths = json.load(f)["ffn_widths"]
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")  # prunes heads
    for layer, w in zip(model.base_model.encoder.layer, widths):
        layer.intermediate.dense = nn.Linear(config.hidden_size, w)
        layer.output.dense = nn.Linear(w, config.hidden_size)
    model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
    return model.eval(), AutoTokenizer.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: FreeLB search of model + gates with L1, online ticket-convergence stop
# ---------------------------------------------------------------------------------------------------------------
def sync_time(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.time()


class StopRule:
    """The online early-bird stop (spec §2.7): checkpoint g is the ticket once its masks stay within epsilon of each
    of the next `window` checkpoints, for heads and neurons. Fed one on-grid checkpoint at a time; draw_index is the
    same rule offline. Checkpoints whose gates are all still equal (never moved) are not judged: ties would rank by
    position and 'converge' trivially."""

    def __init__(self, epsilon: float, window: int):
        self.epsilon, self.window = epsilon, window
        self.head_masks, self.ffn_masks, self.gates, self.moved, self.distances = [], [], [], [], []

    def add(self, head_mask, ffn_mask, gates, epoch) -> Optional[int]:
        """Record a checkpoint; the index of the drawn checkpoint once the rule fires, else None."""
        self.head_masks.append(head_mask)
        self.ffn_masks.append(ffn_mask)
        self.gates.append(gates)
        self.moved.append(bool(np.ptp(gates[0]) > 0 and np.ptp(gates[1]) > 0))
        g = len(self.head_masks) - 1 - self.window  # the checkpoint the rule can judge now
        if g < 0:
            return None
        ok, d_head, d_ffn = window_converged(self.head_masks[g:], self.ffn_masks[g:], self.epsilon)
        self.distances.append({"checkpoint": g, "epoch": epoch[g], "d_head": d_head, "d_ffn": d_ffn})
        return g if ok and self.moved[g] else None


def search_steps(args, steps_per_epoch: int) -> tuple:
    """(schedule length, cap) in steps: the lr schedule spans --search-epochs whatever the stop does."""
    return (max(1, math.ceil(args.search_epochs * steps_per_epoch)),
            max(1, math.ceil(args.max_search_epochs * steps_per_epoch)))


def search_ticket(gated, train_loader, run, args, adversary):
    """Stage 1: FreeLB on the model + gates with L1, a checkpoint every --check-every epochs, until the stop rule
    (or --draw-at) picks a checkpoint or the cap is reached. Returns the search record (search_result)."""
    device, steps_per_epoch = run.device, len(train_loader)
    gated.to(device)
    schedule_steps, max_steps = search_steps(args, steps_per_epoch)
    every = max(1, round(args.check_every * steps_per_epoch))
    if every != args.check_every * steps_per_epoch:
        print(f"[search] checkpoint every {every} steps ({every / steps_per_epoch:.3f} epoch; {steps_per_epoch} "
              f"steps/epoch)", flush=True)
    decay = [p for p in gated.parameters() if p.dim() >= 2]  # gates are decayed too, as in the official code
    no_decay = [p for p in gated.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.search_weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.search_lr)
    scheduler = linear_schedule(optimizer, schedule_steps, args.search_warmup)
    rule, checkpoints = StopRule(args.epsilon, args.window), []
    draw, step, start = None, 0, sync_time(device)
    bar = tqdm(total=max_steps, desc="search", leave=False, disable=None)
    while draw is None and step < max_steps:
        for batch in train_loader:
            gated.train()
            batch = {k: v.to(device) for k, v in batch.items()}
            result = adversarial_backward(gated, batch, adversary, cross_entropy, "freelb", run.autocast)
            l1 = gated.l1_penalty(args.l1_head, args.l1_ffn)
            l1.backward()  # once per step, not attacked and not divided by K (official code)
            torch.nn.utils.clip_grad_norm_(gated.parameters(), GRAD_CLIP)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            lr_share = scheduler.get_last_lr()[0] / args.search_lr
            run.log({"losses/adv_loss": result.loss, "losses/l1": l1.item(), "charts/search_lr_share": lr_share},
                    step)
            if step % every == 0:  # on-grid checkpoints only: an off-grid one at the cap would be closer in steps
                gates = (gated.head_gates.detach().cpu().numpy().copy(), gated.ffn_gates.detach().cpu().numpy().copy())
                checkpoints.append({"step": step, "epoch": step / steps_per_epoch, "lr_share": lr_share})
                draw = rule.add(head_mask_from_gates(gates[0], args.prune_heads, args.head_scope),
                                ffn_mask_from_gates(gates[1], args.prune_ffn), gates, [c["epoch"] for c in checkpoints])
                log_checkpoint(run, rule, gates, step)
                write_json_atomic(os.path.join(run.dir, "search_progress.json"),  # a killed search keeps its curve
                                  {"schedule_steps": schedule_steps, "steps_per_epoch": steps_per_epoch,
                                   "checkpoints": checkpoints, "window_distances": rule.distances})
                if args.draw_at is not None:  # a fixed draw epoch instead of the rule
                    draw = len(checkpoints) - 1 if step >= args.draw_at * steps_per_epoch else None
            if draw is not None or step >= max_steps:
                break
    bar.close()
    return search_result(rule, checkpoints, draw, step, lr_share, sync_time(device) - start, gated, args,
                         steps_per_epoch)


def log_checkpoint(run, rule, gates, step):
    if len(rule.head_masks) > 1:
        run.log({"sparsity/d_head_prev": mask_distance(rule.head_masks[-2], rule.head_masks[-1]),
                 "sparsity/d_ffn_prev": mask_distance(rule.ffn_masks[-2], rule.ffn_masks[-1]),
                 "charts/gate_head_mean": gates[0].mean(), "charts/gate_ffn_mean": gates[1].mean()}, step)
    if rule.distances and rule.distances[-1]["checkpoint"] == len(rule.head_masks) - 1 - rule.window:
        d = rule.distances[-1]
        run.log({"sparsity/window_max_d_head": max(d["d_head"]), "sparsity/window_max_d_ffn": max(d["d_ffn"])}, step)


def search_result(rule, checkpoints, draw, step, lr_at_stop, seconds, gated, args, steps_per_epoch) -> dict:
    """The drawn masks, where the draw and the stop were (epoch, lr share of its peak) and why, and the distances."""
    converged, at_cap = draw is not None, step >= search_steps(args, steps_per_epoch)[1]
    final_gates = (gated.head_gates.detach().cpu().numpy().copy(), gated.ffn_gates.detach().cpu().numpy().copy())
    if not converged:  # the search used its whole budget: the ticket comes from the gates at the stop
        print(f"[search] WARNING: masks did not converge (epsilon {args.epsilon}, window {args.window}) within "
              f"--max-search-epochs {args.max_search_epochs}; drawing from the final gates", flush=True)
        head_keep = head_mask_from_gates(final_gates[0], args.prune_heads, args.head_scope)
        ffn_keep, gates = ffn_mask_from_gates(final_gates[1], args.prune_ffn), final_gates
        at = {"step": step, "epoch": step / steps_per_epoch, "lr_share": lr_at_stop}
    else:
        head_keep, ffn_keep = rule.head_masks[draw], rule.ffn_masks[draw]
        gates, at = rule.gates[draw], checkpoints[draw]
    reasons = (["the search stopped at its cap"] if at_cap else []) + (
        [f"the lr at the draw was {at['lr_share']:.2f} of its peak"] if at["lr_share"] < 0.5 else [])
    if reasons:
        print(f"[search] WARNING: {' and '.join(reasons)}: the masks may have frozen because the search ran out, not "
              f"because the ticket emerged", flush=True)
    n = len(rule.head_masks)
    matrix = {"head": [[mask_distance(rule.head_masks[i], rule.head_masks[j]) for j in range(n)] for i in range(n)],
              "ffn": [[mask_distance(rule.ffn_masks[i], rule.ffn_masks[j]) for j in range(n)] for i in range(n)]}
    print(f"[search] ticket drawn at epoch {at['epoch']:.3f} (step {at['step']}, lr {at['lr_share']:.2f} of peak); "
          f"search stopped at epoch {step / steps_per_epoch:.3f} after {seconds:.1f}s "
          f"({'converged' if converged else 'NOT converged'}{', at the cap' if at_cap else ''})", flush=True)
    return {"head_keep": head_keep, "ffn_keep": ffn_keep, "head_gates": gates[0], "ffn_gates": gates[1],
            "final_gates": final_gates, "converged": converged, "stopped_at_cap": at_cap,
            "converged_at_cap": converged and at_cap, "rule": "convergence" if args.draw_at is None else "draw-at",
            "draw_checkpoint": draw, "draw_epoch": at["epoch"], "draw_step": at["step"],
            "lr_share_at_draw": at["lr_share"], "lr_share_at_stop": lr_at_stop, "stop_epoch": step / steps_per_epoch,
            "stop_step": step, "schedule_steps": search_steps(args, steps_per_epoch)[0], "seconds": seconds,
            "checkpoints": checkpoints, "window_distances": rule.distances, "distance_matrix": matrix,
            "gate_spread_at_draw": {"head": float(np.ptp(gates[0])), "ffn": float(np.ptp(gates[1]))}}


# ---------------------------------------------------------------------------------------------------------------
# Timing helpers (speed report and --bench)
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def inference_throughput(model, loader, run):
    """Sentences per second of forward passes over `loader` (after one warm-up batch)."""
    model.eval().to(run.device)
    batches = [{k: v.to(run.device) for k, v in b.items() if k != "labels"} for b in loader]
    with run.autocast():
        model(**batches[0])
        start = sync_time(run.device)
        for _ in range(THROUGHPUT_REPEATS):
            for b in batches:
                model(**b)
    return THROUGHPUT_REPEATS * sum(b["input_ids"].size(0) for b in batches) / (sync_time(run.device) - start)


def fresh_model(args, num_labels, train_loader=None):
    """The pre-trained model with the seeded classifier; also restarts the shuffled batch order, so the ticket and
    both baselines see the same classifier initialisation and the same batches."""
    set_seed(args.seed)
    if train_loader is not None:
        train_loader.generator.manual_seed(args.seed)
    return load_model(args.model, num_labels, args.max_seq_length, os.path.join(args.output_dir, ".tiny-bert"),
                      attn_implementation="eager")[0]  # the head gates go in through head_mask (eager attention)


def dense_row(args, data, tokenizer, run, loaders, setting, adversary):
    """Train the dense model (plain CE or FreeLB) with the fine-tuning budget; one results row."""
    print(f"=== Baseline: {SETTINGS[setting]} (dense, {args.epochs} epochs) ===", flush=True)
    model = fresh_model(args, data.num_labels, loaders["train"])
    row = results_template(args, METHOD, SETTINGS[setting], model)
    ft = finetune(model, loaders["train"], loaders["dev"], run, args.epochs, args.lr, args.weight_decay, args.warmup,
                  adversary=adversary if setting == "freelb" else None, tag=setting)
    row.update(dev_accuracy=100.0 * ft["dev_accuracy"], sparsity=0.0, compression=1.0)
    row["wall_clock"].update(train=ft["seconds"], finetune=ft["seconds"])
    row["extra"].update(flops_per_token=flops_per_token(model, args.max_seq_length),
                        throughput=inference_throughput(model, loaders["test"], run))
    evaluate_model(model, tokenizer, data, args, run, row, f"{setting}_")
    return row, model


def speedup(freelb_seconds, search_seconds, draw_seconds, finetune_seconds) -> float:
    """Spec §2.10, the one definition: T_FreeLB / (T_search incl. its look-ahead + T_draw + T_fine-tune)."""
    return freelb_seconds / (search_seconds + draw_seconds + finetune_seconds)


def row_of(r):
    keep = ("setting", "params", "sparsity", "compression", "wall_clock", "dev_accuracy", "clean_accuracy", "attacks",
            "pgd_accuracy", "data", "test_predictions", "test_labels")
    return {**{k: r[k] for k in keep}, **{k: r["extra"].get(k) for k in ("flops_per_token", "throughput")}}


# ---------------------------------------------------------------------------------------------------------------
# main: Stage 1 search -> Stage 2 draw (rewind + prune) -> Stage 3 fine-tune the ticket
# ---------------------------------------------------------------------------------------------------------------
def setup(args):
    """Checked flags, the run folder, data, tokenizer, shuffled train / dev / test loaders and the adversary."""
    validate_args(args)
    run = start_run(args, METHOD)
    data = load_task(args)
    model, tokenizer = load_model(args.model, data.num_labels, args.max_seq_length,
                                  os.path.join(args.output_dir, ".tiny-bert"))
    check_ratios_fit(model.config, args)
    if args.ticket_from is not None:
        drawn_ticket(args.ticket_from, model.config, args)  # checked before anything trains
    enc = {s: tokenize(data, getattr(data, s), tokenizer, args.max_seq_length) for s in ("train", "dev", "test")}
    loaders = {"train": make_loader(enc["train"], tokenizer, args.batch_size, shuffle=True, seed=args.seed),
               "dev": make_loader(enc["dev"], tokenizer, args.eval_batch_size, shuffle=False),
               "test": make_loader(enc["test"], tokenizer, args.eval_batch_size, shuffle=False)}
    return run, data, tokenizer, loaders, adversary_from_args(args)


def main(args):
    run, data, tokenizer, loaders, adversary = setup(args)
    if args.baseline:
        results, _ = dense_row(args, data, tokenizer, run, loaders, args.baseline, adversary)
        results["extra"]["rows"] = [row_of(results)]
        print_summary([(results["setting"], results)])
        return finish_run(run, results)

    # ---- Stage 1: search (FreeLB + L1 on gates) until the ticket masks converge ----
    print(f"=== Stage 1: FreeLB search with slimming gates (K={adversary.steps})"
          f"{' skipped: --ticket-from' if args.ticket_from else ''} ===", flush=True)
    model = fresh_model(args, data.num_labels, loaders["train"])
    dense = count_params(model)
    dense_flops = flops_per_token(model, args.max_seq_length)
    dense_throughput = inference_throughput(model, loaders["test"], run)  # the same weights-independent cost
    rewind_state = state_copy(model)  # checkpoint-0: pre-trained weights + seeded classifier
    gated = GatedBert(model)
    if args.ticket_from is None:
        search = search_ticket(gated, loaders["train"], run, args, adversary)
    else:  # the search ran in another process: its measured seconds count in wall_clock.search / train
        search = drawn_ticket(args.ticket_from, model.config, args)
        print(f"[search] skipped: the ticket of {args.ticket_from} (drawn at epoch {search.get('draw_epoch')})",
              flush=True)

    # ---- Stage 2: draw the ticket, rewind to the pre-trained weights, prune physically ----
    print("=== Stage 2: draw, rewind and prune ===", flush=True)
    start = sync_time(run.device)
    model = gated.remove()
    scales = (None, None)
    if args.rewind:
        model.load_state_dict(rewind_state)
    else:  # the weights are the stop step's: fold the stop step's gates into them (the masks are the draw's)
        scales = search["final_gates"]
    prune_model(model, search["head_keep"], search["ffn_keep"], *scales)
    draw_seconds = sync_time(run.device) - start
    ticket = count_params(model)
    print(f"[draw] heads kept per layer {search['head_keep'].sum(1).tolist()}, FFN widths "
          f"{search['ffn_keep'].sum(1).tolist()}; params {ticket['total']:,} / {dense['total']:,}", flush=True)

    # ---- Stage 3: fine-tune the ticket (plain CE as the paper, or FreeLB with --finetune-adv) ----
    print("=== Stage 3: fine-tune the ticket ===", flush=True)
    loaders["train"].generator.manual_seed(args.seed)  # the baselines' batch order
    ft = finetune(model, loaders["train"], loaders["dev"], run, args.epochs, args.lr, args.weight_decay, args.warmup,
                  adversary=adversary if args.finetune_adv else None, tag="ticket")
    save_ticket(model, tokenizer, os.path.join(run.dir, "ticket"), search["head_keep"], search["ffn_keep"])

    results = results_template(args, METHOD, SETTINGS["ticket"], model)
    train_seconds = search["seconds"] + draw_seconds + ft["seconds"]
    results.update(dev_accuracy=100.0 * ft["dev_accuracy"], compression=dense["total"] / ticket["total"],
                   sparsity=1 - ticket["non_embedding"] / dense["non_embedding"])
    results["wall_clock"].update(search=search["seconds"], draw=draw_seconds, finetune=ft["seconds"],
                                 train=train_seconds)
    flops = flops_per_token(model, args.max_seq_length)
    results["extra"].update(
        {k: v for k, v in search.items() if k not in ("head_keep", "ffn_keep", "head_gates", "ffn_gates",
                                                        "final_gates", "seconds")},
        heads_kept=search["head_keep"].sum(1).tolist(), ffn_widths=search["ffn_keep"].sum(1).tolist(),
        dense_params=dense, flops_per_token=flops, dense_flops_per_token=dense_flops, flops_ratio=flops / dense_flops,
        throughput=inference_throughput(model, loaders["test"], run), ticket_dir="ticket")
    evaluate_model(model, tokenizer, data, args, run, results, "ticket_")
    rows = [(results["setting"], results)]
    if args.with_baselines:
        for setting in ("freelb", "finetune"):
            row, _ = dense_row(args, data, tokenizer, run, loaders, setting, adversary)
            rows.append((row["setting"], row))
        freelb_seconds = rows[1][1]["wall_clock"]["train"]
    elif args.baseline_results:
        with open(args.baseline_results) as f:
            freelb_seconds = json.load(f)["wall_clock"].get("train")
    else:
        freelb_seconds = None
    results["extra"]["dense_throughput"] = dense_throughput
    results["extra"]["throughput_ratio"] = results["extra"]["throughput"] / dense_throughput
    if freelb_seconds and args.ticket_from is None:
        ratio = speedup(freelb_seconds, search["seconds"], draw_seconds, ft["seconds"])
        results["extra"].update(freelb_train_seconds=freelb_seconds, speedup_vs_freelb=ratio)
    results["extra"]["rows"] = [row_of(r) for _, r in rows]
    ratio = results["extra"].get("speedup_vs_freelb")
    print(f"[speed] search {search['seconds']:.1f}s + draw {draw_seconds:.2f}s + fine-tune {ft['seconds']:.1f}s = "
          f"{train_seconds:.1f}s" + (f"; FreeLB {freelb_seconds:.1f}s -> speed-up {ratio:.2f}x" if ratio else "")
          + f"; inference {results['extra']['throughput_ratio']:.2f}x dense; FLOPs {flops / dense_flops:.3f} of dense",
          flush=True)
    print_summary(rows)
    finish_run(run, results)


if __name__ == "__main__":
    with usage_errors():
        cli_args = parse_args()
        if cli_args.bench:
            from bench import bench_early_bird
            bench_early_bird(cli_args)
        else:
            main(cli_args)
