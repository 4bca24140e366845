# Robust Lottery Tickets for Pre-trained Language Models (ACL 2022, arXiv 2211.03013)
# Stage 1 fine-tune; Stage 2 learn hard-concrete masks (Eqs. 1-5) with an adversarial loss + L0 penalty (Eqs. 6-8) on
# frozen weights; Stage 3 draw a ticket by global bottom-k of log(alpha), rewind it to the pre-trained weights, retrain.
# Usage, logged diagnostics, numbered deviations and results: docs/robust_ticket.md.
import argparse
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from attacks import evaluate_model, print_summary
from common import (UsageError, add_adversary_args, add_common_args, adversarial_backward, adversary_from_args,
                    check_range, count_params, evaluate_accuracy, finetune, finish_run, linear_schedule, load_model,
                    load_task, make_loader, results_template, start_run, state_copy, tokenize, usage_errors,
                    validate_common_args, write_json_atomic)

METHOD = "robust_ticket"
# hard-concrete distribution (Louizos et al. 2018), as in the paper and the official masked_linear.py
GAMMA, ZETA = -0.1, 1.1  # stretch limits ("l", "r" in the official code)
BETA = 2.0 / 3.0  # temperature, fixed (never annealed)
U_EPS = 1e-4  # u ~ U(0, 1) clamped to [U_EPS, 1 - U_EPS]
EVAL_ZERO_LOG_ALPHA = math.log(1 / 11)  # -2.398: eval gate (Eq. 5) exactly 0 at or below it, exactly 1 at or above -it


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Robust lottery tickets (Zheng et al., ACL 2022): search, draw, retrain")
    add_common_args(p, METHOD, lr=2e-5, epochs=3)
    add_adversary_args(p, steps=5, lr=0.03, init_mag=0.05, max_norm=0.0)  # Table 6, SST-2; unbounded (App. B.3)
    m = p.add_argument_group("robust ticket")
    m.add_argument("--finetuned", default=None, help="reuse this fine-tuned checkpoint folder as stage 1 (theta)")
    m.add_argument("--skip-finetune-eval", action="store_true", help="do not evaluate/attack the Fine-tune row")
    m.add_argument("--mask-init", type=float, default=0.9, help="initial eval gate value (code mask_p; -> log a=ln 5)")
    m.add_argument("--mask-lr", type=float, default=0.1, help="AdamW lr of the mask scores log(alpha) (Table 6)")
    m.add_argument("--mask-weight-decay", type=float, default=1e-6, help="weight decay of log(alpha) (Table 6)")
    m.add_argument("--search-epochs", type=float, default=20, help="epochs of mask search (official code)")
    m.add_argument("--max-grad-norm", type=float, default=1.0, help="clip of the adversarial grad of log a; 0: none")
    m.add_argument("--l0-lambda", type=float, default=0.5, help="lambda of R(m), Eq. 6 (Table 6); 0: 'w/o L0' ablation")
    m.add_argument("--l0-normalise", action="store_true", help="lambda x (masked weights / bert-base's) x (paper's "
                   "search steps / this search's): the paper's L0 push per weight on a smaller model or a shorter "
                   "search (deviation 16 in docs/robust_ticket.md; bert-base at 20 SST-2 epochs: x 1)")
    m.add_argument("--lambda-startup", type=float, default=0.1, help="share of search steps with lambda_t = 0")
    m.add_argument("--lambda-warmup", type=float, default=0.3, help="share of search steps of the linear lambda ramp")
    m.add_argument("--l0-mean", default="global", choices=["global", "per-matrix"],
                   help="R(m) as the global mean of Eq. 4, or the official mean of per-matrix means")
    m.add_argument("--search-select", default="dev", choices=["dev", "last"],
                   help="mask checkpoint: best dev accuracy with eval (soft) gates, per epoch (code), or the last")
    m.add_argument("--diag-points", type=int, default=20, help="times the gate diagnostics are logged in the search")
    m.add_argument("--mask-scores", default=None, help="skip stage 2: load log(alpha) from a mask_scores.pt")
    m.add_argument("--draw", default="robust", choices=["robust", "magnitude", "random"],
                   help="rank by learned log(alpha) (RobustT), |fine-tuned weight| (w/o mask learning), or random")
    m.add_argument("--sparsity", default="0.3", help="share of masked weights pruned; a comma list draws several")
    m.add_argument("--rewind", action=argparse.BooleanOptionalAction, default=True,
                   help="retrain from the pre-trained weights theta_0 with a fresh classifier (paper, Sec. 3.3)")
    m.add_argument("--retrain-epochs", type=float, default=3, help="ticket retraining epochs (Table 5)")
    m.add_argument("--retrain-adv", action="store_true", help="retrain the ticket with FreeLB (paper: plain CE)")
    m.add_argument("--bench", action="store_true", help="time search vs dense FreeLB step, ticket vs dense inference")
    m.add_argument("--bench-steps", type=int, default=2, help="timed steps per measurement of --bench")
    m.add_argument("--bench-seq-length", type=int, default=32, help="tokens per sequence of the --bench batches")
    args = p.parse_args(argv)
    validate_common_args(args)
    try:
        args.sparsities = [float(s) for s in args.sparsity.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--sparsity must be numbers in [0, 1) separated by commas, got '{args.sparsity}'")
    for s in args.sparsities:
        check_range("sparsity", s, 0, 1, high_open=True)
    if not args.sparsities or len(set(args.sparsities)) != len(args.sparsities):
        raise UsageError(f"--sparsity '{args.sparsity}' must list distinct values, e.g. 0.3 or 0.3,0.5,0.7")
    check_range("mask-init", args.mask_init, 0, 1, low_open=True, high_open=True)
    for name in ("mask_lr", "search_epochs", "retrain_epochs"):
        check_range(name.replace("_", "-"), getattr(args, name), 0, low_open=True)
    for name in ("l0_lambda", "mask_weight_decay", "max_grad_norm"):
        check_range(name.replace("_", "-"), getattr(args, name), 0)
    for name, low, high in (("lambda_startup", 0, 1), ("lambda_warmup", 0, 1), ("bench_steps", 1, None),
                            ("diag_points", 1, None), ("bench_seq_length", 8, 512)):
        check_range(name.replace("_", "-"), getattr(args, name), low, high)
    if args.finetuned is not None and not os.path.isfile(os.path.join(args.finetuned, "config.json")):
        raise UsageError(f"--finetuned {args.finetuned} has no config.json: give an earlier run's 'finetuned' folder")
    if args.mask_scores is not None and not os.path.isfile(args.mask_scores):
        raise UsageError(f"--mask-scores {args.mask_scores} does not exist; give the mask_scores.pt of a search run")
    if args.mask_scores is not None and args.finetuned is None:
        raise UsageError("--mask-scores needs --finetuned (the fine-tuned model they were searched on)")
    adversary_from_args(args)
    return args


# ---------------------------------------------------------------------------------------------------------------
# Hard-concrete gates (paper Sec. 3.2, Eqs. 1-5)
# ---------------------------------------------------------------------------------------------------------------
class HardConcreteGate(nn.Module):
    """One stochastic gate per weight: a fresh sample per forward in train mode, the deterministic gate in eval."""

    def __init__(self, shape, init: float, device=None):
        super().__init__()
        p = (init - GAMMA) / (ZETA - GAMMA)  # the eval gate (Eq. 5) equals `init` everywhere: sigmoid(log_alpha) = p
        self.log_alpha = nn.Parameter(torch.full(shape, math.log(p / (1 - p)), device=device))

    def forward(self):
        if not self.training:
            return self.deterministic()
        u = torch.rand_like(self.log_alpha).clamp_(U_EPS, 1 - U_EPS)  # u ~ U(0, 1), a fresh sample per forward
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / BETA)  # Eq. 1
        s_bar = s * (ZETA - GAMMA) + GAMMA  # Eq. 2: stretch to (gamma, zeta)
        return s_bar.clamp(0.0, 1.0)  # Eq. 3: hard-clip, so a gate is exactly 0 or 1 with non-zero probability

    def deterministic(self):
        """Eq. 5, the test-time gate: soft in (0, 1), exactly 0 / 1 for log alpha beyond -/+ 2.398."""
        return torch.sigmoid(self.log_alpha).mul(ZETA - GAMMA).add_(GAMMA).clamp_(0.0, 1.0)

    def expected_l0(self):
        """Eq. 4 per gate: P(gate != 0) = sigmoid(log alpha - beta * log(-gamma / zeta))."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-GAMMA / ZETA))


class MaskedLinear(nn.Module):
    """F.linear(x, W * gate(), b): the frozen Linear is kept as is; only one masked weight exists at a time."""

    def __init__(self, linear: nn.Linear, init: float):
        super().__init__()
        self.linear = linear
        self.gate = HardConcreteGate(linear.weight.shape, init, linear.weight.device)

    def forward(self, x):
        return F.linear(x, self.linear.weight * self.gate(), self.linear.bias)


def masked_linears(model) -> list:
    """(name, Linear) of every linear layer of the encoder and pooler: Q, K, V, attention output, FFN in/out, pooler
    (73 for bert-base); the embeddings, LayerNorms, biases and the classifier head are never masked."""
    body = getattr(model, "base_model", model)
    prefix = getattr(model, "base_model_prefix", "")
    layers = [(f"{prefix}.{n}" if body is not model else n, m) for n, m in body.named_modules()
              if isinstance(m, nn.Linear)]
    if not layers:
        raise UsageError(f"{type(model).__name__} has no nn.Linear layers to mask; use a BERT-family model")
    return layers


def attach_gates(model, init: float) -> dict:
    """Wrap every masked linear in a MaskedLinear; freeze all weights (only log_alpha is trained). -> {name: gate}"""
    model._trainable_before_gates = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    gates = {}
    for name, linear in masked_linears(model):
        wrapped = MaskedLinear(linear, init)
        model.set_submodule(name, wrapped)
        gates[name] = wrapped.gate
    return gates


def detach_gates(model):
    """Unwrap the MaskedLinears and make the weights as trainable as they were before attach_gates."""
    for name, wrapped in list(model.named_modules()):
        if isinstance(wrapped, MaskedLinear):
            model.set_submodule(name, wrapped.linear)
    for p, trainable in zip(model.parameters(), model.__dict__.pop("_trainable_before_gates", [])):
        p.requires_grad_(trainable)


def l0_penalty(gates: dict, mode: str = "global"):
    """R(m), Eq. 4: expected share of non-zero gates (global mean), or the official mean of per-matrix means."""
    if mode == "per-matrix":
        return torch.stack([g.expected_l0().mean() for g in gates.values()]).mean()
    total = sum(g.log_alpha.numel() for g in gates.values())
    return sum(g.expected_l0().sum() for g in gates.values()) / total


@torch.no_grad()
def gate_stats(gates: dict) -> dict:
    """The mask's state: expected L0 (Eq. 4), share of eval gates (Eq. 5) exactly 0 or 1, and exactly 0."""
    m = torch.cat([g.deterministic().flatten() for g in gates.values()])
    return {"sparsity/expected_l0": l0_penalty(gates).item(), "sparsity/binary_share": ((m == 0) | (m == 1)).float()
            .mean().item(), "sparsity/eval_zero_share": (m == 0).float().mean().item()}


# bert-base-uncased (73 masked matrices) searched for 20 epochs of SST-2 at batch 32: the paper's setting of lambda
BERT_BASE_MASKED = 85_524_480
PAPER_SEARCH_STEPS = 20 * 2105


def l0_scale(n_masked: int, total_steps: int, normalise: bool) -> float:
    """Deviation 16: R(m) is a mean over N weights, so each weight's L0 gradient is lambda/N, and a search of T steps
    gives it T pushes; --l0-normalise keeps lambda * T / N at the paper's value (bert-base, 42,100 steps)."""
    return (n_masked / BERT_BASE_MASKED) * (PAPER_SEARCH_STEPS / total_steps) if normalise else 1.0


def lambda_at(step: int, total: int, args, scale: float = 1.0) -> float:
    """lambda_t: 0 for the first 10 % of steps, a linear ramp over the next 30 %, then lambda (as the paper intends)."""
    ramp = (step - args.lambda_startup * total) / max(args.lambda_warmup * total, 1e-12)
    return scale * args.l0_lambda * min(max(ramp, 0.0), 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Stage 2: adversarial mask search (Eq. 6: min_m E max_delta L(f(x + delta; m * theta), y) + lambda R(m))
# ---------------------------------------------------------------------------------------------------------------
def search_masks(model, train_loader, dev_loader, run, args, adv) -> tuple:
    """Learn log_alpha on the frozen fine-tuned model. Returns ({name: log_alpha on CPU}, search record)."""
    device = run.device
    gates = attach_gates(model.to(device), args.mask_init)
    log_alphas = [g.log_alpha for g in gates.values()]
    optimizer = torch.optim.AdamW(log_alphas, lr=args.mask_lr, weight_decay=args.mask_weight_decay)
    total = max(1, math.ceil(args.search_epochs * len(train_loader)))
    scheduler = linear_schedule(optimizer, total, args.warmup)
    n_gates = sum(a.numel() for a in log_alphas)
    scale = l0_scale(n_gates, total, args.l0_normalise)
    epoch_ends = {min(total, (e + 1) * len(train_loader)) for e in range(math.ceil(args.search_epochs))}
    diag_steps = {min(total, math.ceil(total * (i + 1) / args.diag_points)) for i in range(args.diag_points)}
    best = {"dev_accuracy": -1.0, "scores": None, "step": 0}
    history, curve, grads, step, started = [], [{"step": 0, **gate_stats(gates)}], [], 0, time.time()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    print(f"[search] {len(gates)} masked matrices, {n_gates:,} gates, K={adv.steps}, "
          f"lambda {args.l0_lambda} x scale {scale:.3g} = {args.l0_lambda * scale:.4g}, {total} steps", flush=True)
    bar = tqdm(total=total, desc="search", leave=False, disable=None)
    while step < total:
        for batch in train_loader:
            model.train()
            batch = {k: v.to(device) for k, v in batch.items()}
            # Eqs. 6-8 as FreeLB (official code): grads of log_alpha averaged over the K ascent states, a fresh gate
            # sample per forward; token_type_ids are passed (the code drops them)
            result = adversarial_backward(model, batch, adv, mode="freelb", autocast=run.autocast)
            adv_norm = torch.nn.utils.get_total_norm([a.grad for a in log_alphas]).item()
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(log_alphas, args.max_grad_norm)
            lam = lambda_at(step, total, args, scale)
            penalty = l0_penalty(gates, args.l0_mean)  # + lambda_t R(m), outside the max and unclipped (as the code)
            l0_norm = l0_wins = 0.0
            if lam > 0:  # per gate, Adam follows whichever part is larger: count where the L0 part is
                l0_grads = torch.autograd.grad(lam * penalty, log_alphas)
                l0_wins = sum((g.abs() > a.grad.abs()).sum().item() for a, g in zip(log_alphas, l0_grads)) / n_gates
                l0_norm = torch.nn.utils.get_total_norm(l0_grads).item()
                for a, g in zip(log_alphas, l0_grads):
                    a.grad.add_(g)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.3f}", l0=f"{penalty.item():.3f}")
            grads.append((adv_norm, l0_norm, l0_wins))
            run.log({"losses/adv_loss": result.loss, "losses/adv_loss_first_step": result.losses[0],
                     "losses/l0_penalty": penalty.item(), "charts/lambda": lam,
                     "charts/mask_lr": scheduler.get_last_lr()[0],
                     "diagnostics/adv_grad_norm": adv_norm, "diagnostics/l0_grad_norm": l0_norm,
                     "diagnostics/l0_wins_share": l0_wins}, step)
            if step in diag_steps:  # the mask's trajectory, and how hard the L0 part pushed against the adversarial
                adv_g, l0_g, wins = np.mean(grads, axis=0)
                curve.append({"step": step, **gate_stats(gates), "adv_grad_norm": adv_g, "l0_grad_norm": l0_g,
                              "l0_over_adv": l0_g / max(adv_g, 1e-30), "l0_wins_share": wins})
                grads = []
                run.log({f"diagnostics/{k}": v for k, v in curve[-1].items() if k != "step"}, step)
            if step in epoch_ends:
                acc = evaluate_accuracy(model, dev_loader, device, run.autocast)  # eval gates: soft (code)
                stats = gate_stats(gates)
                run.log({"eval/search_dev_accuracy": acc, **stats}, step)
                history.append({"step": step, "dev_accuracy": acc, **stats})
                print(f"[search] step {step}/{total} dev acc {acc:.4f}  E[L0] {stats['sparsity/expected_l0']:.3f}  "
                      f"binary {stats['sparsity/binary_share']:.3f}  zero {stats['sparsity/eval_zero_share']:.3f}  "
                      f"L0 > adv on {100 * curve[-1].get('l0_wins_share', 0):.1f}% of gates", flush=True)
                if args.search_select == "last" or acc > best["dev_accuracy"]:
                    scores = {n: g.log_alpha.detach().to("cpu", copy=True) for n, g in gates.items()}
                    best = {"dev_accuracy": acc, "scores": scores, "step": step, "stats": stats}
            if step >= total:
                break
    bar.close()
    if best["step"] != total:  # the end state too, to draw from it later with --mask-scores
        torch.save({n: g.log_alpha.detach().cpu() for n, g in gates.items()}, f"{run.dir}/mask_scores_last.pt")
    detach_gates(model)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    seconds = (time.time() - started) / total
    print(f"[search] {total} steps, {seconds:.3f} s/step (dev evals included)"
          + (f", peak GPU memory {peak:.1f} GiB" if peak else ""), flush=True)
    if max(p["l0_wins_share"] for p in curve[1:]) < 0.01 and args.l0_lambda > 0:
        print("[search] warning: the L0 gradient exceeded the adversarial one on < 1 % of the gates: lambda did next "
              "to nothing (try --l0-normalise or a larger --l0-lambda)", flush=True)
    return best["scores"], {"history": history, "curve": curve, "selected_step": best["step"],
                            "selected_stats": best.get("stats"), "dev_accuracy": best["dev_accuracy"], "steps": total,
                            "l0_scale": scale, "lambda_effective": args.l0_lambda * scale,
                            "adversary": {"steps": adv.steps, "lr": adv.lr, "init_mag": adv.init_mag},
                            "seconds_per_step": seconds, "peak_gpu_gib": peak}


# ---------------------------------------------------------------------------------------------------------------
# Stage 3: draw (global bottom-k), rewind, fold, retrain, export
# ---------------------------------------------------------------------------------------------------------------
def draw_masks(scores: dict, sparsities: list) -> list:
    """One {name: bool keep-mask} per sparsity s, pruning exactly round(s * N) of the N weights with the lowest score
    over all matrices together (official: global_unstructured L1 on sigmoid(log alpha)); ties broken by position."""
    flat = torch.cat([v.detach().flatten().float().cpu() for v in scores.values()])
    order = torch.argsort(flat, stable=True)
    masks = []
    for s in sparsities:
        keep = torch.ones(flat.numel(), dtype=torch.bool)
        keep[order[: int(round(s * flat.numel()))]] = False
        chunks = keep.split([v.numel() for v in scores.values()])
        masks.append({n: c.view(v.shape) for (n, v), c in zip(scores.items(), chunks)})
    return masks


def fully_pruned(masks: dict) -> list:
    """Matrices a global draw prunes entirely (e.g. a small-weight pooler under --draw magnitude)."""
    return [n for n, keep in masks.items() if not keep.any()]


def draw_scores(model, args) -> dict:
    """Scores of the ablation draws: |fine-tuned weight| (one-shot magnitude, "w/o mask learning") or random (Rand)."""
    layers = masked_linears(model)
    if args.draw == "magnitude":
        return {n: m.weight.detach().abs().cpu() for n, m in layers}
    gen = torch.Generator().manual_seed(args.seed)
    return {n: torch.rand(m.weight.shape, generator=gen) for n, m in layers}


def fold_mask(model, masks: dict) -> list:
    """W <- m * W (pruned weights exactly 0) and keep them at 0 while retraining by masking their gradients
    (AdamW then never moves them: zero moments, and decoupled decay of 0 is 0). Returns the hook handles."""
    layers = dict(masked_linears(model))
    handles = []
    for name, keep in masks.items():
        weight = layers[name].weight
        drop = ~keep.to(weight.device)  # bool: a quarter of a float mask's memory
        with torch.no_grad():
            weight.masked_fill_(drop, 0.0)
        if weight.requires_grad:
            handles.append(weight.register_hook(lambda grad, drop=drop: grad.masked_fill(drop, 0.0)))
    return handles


def save_mask(path: str, masks: dict):
    """The mask as bits (np.packbits of the kept flags in layer order) with the layer names and shapes."""
    bits = torch.cat([m.flatten() for m in masks.values()]).numpy()
    np.savez_compressed(path, bits=np.packbits(bits), names=np.array(list(masks)),
                        shapes=np.array([",".join(map(str, m.shape)) for m in masks.values()]), n=len(bits))


def load_mask(path: str) -> dict:
    stored = np.load(path)
    bits = torch.from_numpy(np.unpackbits(stored["bits"], count=int(stored["n"])).astype(bool))
    shapes = [tuple(int(d) for d in s.split(",")) for s in stored["shapes"]]
    chunks = bits.split([math.prod(s) for s in shapes])
    return {str(n): c.view(s) for n, c, s in zip(stored["names"], chunks, shapes)}


def sparsity_of(model, masks: dict) -> dict:
    pruned, masked = sum((~m).sum().item() for m in masks.values()), sum(m.numel() for m in masks.values())
    params = count_params(model)
    return {"pruned": pruned, "masked_weights": masked, "over_masked": pruned / masked,
            "over_all": pruned / params["total"], "over_non_embedding": pruned / params["non_embedding"],
            "params": {**params, "nonzero": params["total"] - pruned}, "fully_pruned": fully_pruned(masks)}


def row_of(results: dict) -> dict:
    keys = ("setting", "params", "sparsity", "compression", "wall_clock", "dev_accuracy", "clean_accuracy", "attacks",
            "pgd_accuracy", "data", "test_predictions", "test_labels")
    return {k: results[k] for k in keys} | {"extra": {k: v for k, v in results["extra"].items() if k != "rows"}}


def reseed(seed: int, train_loader):  # the same head, data order and dropout for every draw and ablation
    torch.manual_seed(seed)
    train_loader.generator.manual_seed(seed)


def setting_name(args, s: float) -> str:
    """Rows of Tables 1 / 3. w/o Adv: K gate samples, zero perturbation (--adv-lr 0 --adv-init-mag 0), or K = 0."""
    if args.draw != "robust":
        return f"{args.draw} s={s:g}"
    if args.adv_steps == 0 or (args.adv_lr == 0 and args.adv_init_mag == 0):
        return f"w/o adv s={s:g}"
    return f"{'w/o L0' if args.l0_lambda == 0 else 'ticket'} s={s:g}"


def rewound_ticket(args, num_labels: int, cache: str, finetuned_state: dict):
    """Sec. 3.3: restart from the pre-trained theta_0 with a fresh classifier (--no-rewind: from the fine-tuned)."""
    ticket, _ = load_model(args.model, num_labels, args.max_seq_length, cache)
    if not args.rewind:
        ticket.load_state_dict(finetuned_state)
    return ticket


def learned_zero_share(scores: dict) -> float:
    """Share of gates the search drove to exactly 0 at eval (log alpha <= -2.398, Eq. 5)."""
    return torch.cat([v.flatten() for v in scores.values()]).le(EVAL_ZERO_LOG_ALPHA).float().mean().item()


def export(model, tokenizer, out: str, masks=None):
    """A standard checkpoint (a ticket's mask is folded into its weights), plus a ticket's bit-packed mask."""
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if masks is not None:
        save_mask(os.path.join(out, "mask.npz"), masks)


def ticket_row(ticket, tokenizer, masks, s, data, args, run, wall, retrain, search, zero_share) -> dict:
    """Evaluate and attack a retrained ticket; its row of results.json."""
    start, sp = time.time(), sparsity_of(ticket, masks)
    print(f"[draw s={s:g}] pruned {sp['pruned']:,} of {sp['masked_weights']:,} masked weights "
          f"({100 * sp['over_masked']:.2f}%; {100 * sp['over_all']:.2f}% of all parameters)", flush=True)
    res = results_template(args, METHOD, setting_name(args, s), ticket)
    res.update(params=sp["params"], sparsity=sp["over_masked"], compression=1 / (1 - sp["over_all"]),
               dev_accuracy=100.0 * retrain["dev_accuracy"])
    evaluate_model(ticket, tokenizer, data, args, run, res, prefix=f"ticket_s{s:g}_")
    res["wall_clock"] = {**wall, "eval": time.time() - start}
    res["extra"] = {"target_sparsity": s, "sparsity": sp, "draw": args.draw, "rewind": args.rewind,
                    "learned_zero_share": zero_share, "draw_beyond_learned": zero_share is not None
                    and s > zero_share + 0.01, "l0_lambda": args.l0_lambda, "l0_normalise": args.l0_normalise,
                    "retrain": retrain, "search": search, "checkpoint": f"ticket_s{s:g}"}
    return row_of(res)


# ---------------------------------------------------------------------------------------------------------------
def main(args):
    if args.bench:
        from bench import bench_robust_ticket
        return bench_robust_ticket(args)
    run = start_run(args, METHOD)
    data = load_task(args)
    cache = os.path.join(run.dir, "tiny-bert")
    model, tokenizer = load_model(args.finetuned or args.model, data.num_labels, args.max_seq_length, cache)
    train_loader = make_loader(tokenize(data, data.train, tokenizer, args.max_seq_length), tokenizer, args.batch_size,
                               shuffle=True, seed=args.seed)
    dev_loader = make_loader(tokenize(data, data.dev, tokenizer, args.max_seq_length), tokenizer, args.eval_batch_size,
                             shuffle=False)
    adv = adversary_from_args(args)
    wall, rows = {}, []

    # ---- Stage 1: fine-tune the dense model (theta), the "Fine-tune" row ------------------------------------------
    start, ft = time.time(), {}  # with --finetuned, its dev accuracy is only needed for the Fine-tune row
    if args.finetuned is None:
        ft = finetune(model, train_loader, dev_loader, run, args.epochs, args.lr, args.weight_decay, args.warmup,
                      tag="stage1")
        export(model, tokenizer, os.path.join(run.dir, "finetuned"))
    model.to(run.device)
    wall["stage1_finetune"] = time.time() - start
    finetuned_state = state_copy(model)
    if not args.skip_finetune_eval:
        start = time.time()
        ft_results = results_template(args, METHOD, "Fine-tune", model) | {"sparsity": 0.0, "compression": 1.0}
        ft_results["dev_accuracy"] = 100.0 * (ft["dev_accuracy"] if ft else
                                              evaluate_accuracy(model, dev_loader, run.device, run.autocast))
        evaluate_model(model, tokenizer, data, args, run, ft_results, prefix="finetune_")
        ft_results["wall_clock"] = {"stage1_finetune": wall["stage1_finetune"], "eval": time.time() - start}
        rows.append(row_of(ft_results))

    # ---- Stage 2: search the robust ticket: hard-concrete masks on the frozen theta --------------------------------
    start, search = time.time(), {}
    if args.draw != "robust":
        scores = draw_scores(model, args)
    elif args.mask_scores is not None:
        scores = torch.load(args.mask_scores)
        shapes = {n: m.weight.shape for n, m in masked_linears(model)}
        if {n: v.shape for n, v in scores.items()} != shapes:
            raise UsageError(f"--mask-scores {args.mask_scores} does not match the layers of {args.model}")
    else:
        reseed(args.seed, train_loader)
        scores, search = search_masks(model, train_loader, dev_loader, run, args, adv)
        torch.save(scores, os.path.join(run.dir, "mask_scores.pt"))
        write_json_atomic(os.path.join(run.dir, "search.json"), search)  # the diagnostics, before any retraining
        assert all(torch.equal(v.cpu(), finetuned_state[k]) for k, v in model.state_dict().items()), "weights moved"
    wall["stage2_search"] = time.time() - start
    zero_share = learned_zero_share(scores) if args.draw == "robust" else None

    # ---- Stage 3: at each sparsity: draw, rewind to theta_0, retrain with the mask folded in, export; evaluate -----
    for s, masks in zip(args.sparsities, draw_masks(scores, args.sparsities)):  # 1. draw: global bottom-k of scores
        start = time.time()
        if zero_share is not None and s > zero_share + 0.01:
            print(f"[draw s={s:g}] warning: the search drove only {100 * zero_share:.1f}% of gates to 0; the other "
                  f"{100 * (s - zero_share):.1f}% of this draw are ranked by log alpha the search did not decide")
        if cut := fully_pruned(masks):  # the network is disconnected there, whatever the retraining does
            print(f"[draw s={s:g}] warning: prunes all of {', '.join(cut)}: the network is cut there", flush=True)
        reseed(args.seed, train_loader)
        ticket = rewound_ticket(args, data.num_labels, cache, finetuned_state).to(run.device)  # 2. rewind
        hooks = fold_mask(ticket, masks)
        retrain = finetune(ticket, train_loader, dev_loader, run, args.retrain_epochs, args.lr, args.weight_decay,
                           args.warmup, adversary=adv if args.retrain_adv else None, tag=f"retrain_s{s:g}")  # 3.
        for h in hooks:
            h.remove()
        assert all((m.weight[~masks[n].to(run.device)] == 0).all() for n, m in masked_linears(ticket)), "mask leaked"
        export(ticket, tokenizer, os.path.join(run.dir, f"ticket_s{s:g}"), masks)  # 4. export
        wall_s = {**wall, "stage3_retrain": time.time() - start}
        rows.append(ticket_row(ticket, tokenizer, masks, s, data, args, run, wall_s, retrain, search, zero_share))
        ticket.cpu()

    main_row = next(r for r in rows if r["setting"] != "Fine-tune")
    results = results_template(args, METHOD, main_row["setting"]) | main_row
    results["wall_clock"] = dict(main_row["wall_clock"])  # finish_run adds "total" to the top level only
    results["extra"] = {**main_row["extra"], "rows": rows}
    finish_run(run, results)
    print_summary([(r["setting"], r) for r in rows])
    return results


if __name__ == "__main__":
    with usage_errors():
        main(parse_args())
