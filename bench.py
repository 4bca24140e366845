# Benchmark of the shared attack wrapper (README.md section "Benchmarks"): the same recipe on the same examples through
# attacks.Predictor (dynamic padding, batched, eval mode) and through TextAttack's stock HuggingFaceModelWrapper (pads
# every query to tokenizer.model_max_length). Prints whether the per-example outcomes agree and the speed ratio.
# With --compare-workers N: the same seeded sample attacked by 1 and by N attack workers (outcomes and time ratio).
# Also the methods' benchmarks that their scripts' --bench flags call (bench_robust_ticket, bench_early_bird,
# bench_rosearch, bench_adapter_mixup), and the inference throughput of a model through attacks.Predictor
# (examples_per_second).
import argparse
import copy
import json
import os
import time
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch

from attacks import Predictor, attack_sample, build_attack, callable_wrapper, run_attack, spawn_spec
from common import (Adversary, add_common_args, adversarial_backward, adversary_from_args, count_params, cross_entropy,
                    finetune, load_model, load_task, make_loader, pick_device, set_seed, start_run, sync, texts_of,
                    tokenize, usage_errors, validate_common_args)
from offline import minilm_path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Attack wrapper benchmark: project wrapper vs TextAttack's stock one.")
    add_common_args(parser, "bench_wrapper", attacks="deepwordbug", lr=1e-4, epochs=1)
    parser.add_argument("--finetuned", default=None, help="a fine-tuned checkpoint to attack (default: fine-tune "
                        "--model on --max-train-examples first)")
    parser.add_argument("--compare-workers", type=int, default=0, metavar="N", help="instead: attack the sample with "
                        "1 and with N --attack-workers, compare per-example outcomes and time")
    parser.set_defaults(task="sst2", max_train_examples=1000, attack_examples=50, model=minilm_path() or "tiny")
    return parser.parse_args(argv)


def timed_attack(name, wrapper, samples, columns, batch_size, workers=1, spawn=None):
    attack = build_attack(name, wrapper, model_batch_size=batch_size)
    start = time.time()
    summary, rows = run_attack(attack, samples, columns, desc=name, workers=workers, spawn=spawn)
    return time.time() - start, summary, [(r["result"], r["perturbed_text"]) for r in rows]


def compare_workers(args, samples, columns, predict, device):
    """1 worker vs N workers on the same seeded sample: identical outcomes expected, time ratio measured (on CUDA
    the N workers are spawned round-robin over the visible GPUs, as in a method's attack evaluation)."""
    wrapper = callable_wrapper(predict)
    print(f"{'attack':<14}{'1 worker s':>12}{f'{args.compare_workers} workers s':>14}{'speed-up':>10}"
          f"{'same outcome':>14}{'aua':>8}")
    for name in args.attacks.split(","):
        t_one, s_one, r_one = timed_attack(name, wrapper, samples, columns, args.eval_batch_size)
        spawn = spawn_spec(predict, name, None, args, device, args.compare_workers)
        t_n, _, r_n = timed_attack(name, wrapper, samples, columns, args.eval_batch_size, args.compare_workers, spawn)
        same = sum(a == b for a, b in zip(r_one, r_n))
        print(f"{name:<14}{t_one:>12.1f}{t_n:>14.1f}{t_one / t_n:>9.2f}x{same:>9}/{len(samples):<4}"
              f"{s_one['aua']:>8.1f}", flush=True)


# ---- robust_ticket.py --bench: one mask-search step vs one dense FreeLB step (same K), ticket vs dense inference ----
def bench_robust_ticket(args):
    """Dense and masked copies of one model, timed in alternation (drifting load hits both alike). On CPU the clock is
    the CPU time of a single thread, so other jobs on a shared machine do not skew the ratio; on CUDA, wall time."""
    from robust_ticket import attach_gates, draw_masks, draw_scores, fold_mask, l0_penalty

    device = pick_device(args.cuda)
    if device.type == "cpu":
        torch.set_num_threads(1)  # idle threads spin and would count as CPU time
    adv = adversary_from_args(args)
    dense, _ = load_model(args.model, 2, args.max_seq_length, os.path.join(args.output_dir, ".tiny-bert"))
    masked = copy.deepcopy(dense)
    gates = attach_gates(masked, args.mask_init)
    dense.to(device), masked.to(device)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(1000 if dense.config.vocab_size > 2000 else 5, dense.config.vocab_size,
                        (args.batch_size, args.bench_seq_length), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
             "labels": torch.randint(0, 2, (args.batch_size,), generator=gen)}
    batch = {k: v.to(device) for k, v in batch.items()}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    clock = time.perf_counter if device.type == "cuda" else time.process_time

    def timed_pair(fn_a, fn_b):
        totals = [0.0, 0.0]
        for rep in range(args.bench_steps + 1):  # the first round warms up
            for i, fn in enumerate((fn_a, fn_b)):
                sync(device)
                start = clock()
                fn()
                sync(device)
                totals[i] += (clock() - start) if rep else 0.0
        return totals[0] / args.bench_steps, totals[1] / args.bench_steps

    def train_step(model, params, penalty=None):
        opt = torch.optim.AdamW(params, lr=1e-12)

        def step():
            model.train()
            adversarial_backward(model, batch, adv, mode="freelb")
            if penalty is not None:
                penalty().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    dense_step, search_step = timed_pair(train_step(dense, list(dense.parameters())),
                                         train_step(masked, [g.log_alpha for g in gates.values()],
                                                    lambda: l0_penalty(gates)))
    masked = gates = None  # free the masked copy before the inference timing
    ticket = copy.deepcopy(dense).eval()
    fold_mask(ticket, draw_masks(draw_scores(ticket, args), [max(args.sparsities)])[0])
    dense.eval()
    with torch.no_grad():
        dense_inf, ticket_inf = timed_pair(lambda: dense(**inputs), lambda: ticket(**inputs))
    unit = "ms wall" if device.type == "cuda" else "ms CPU"
    print(f"[bench] model {args.model} device {device} batch {args.batch_size}x{args.bench_seq_length} K={adv.steps}")
    print(f"[bench] dense FreeLB step {dense_step * 1e3:.1f} {unit}   mask-search step {search_step * 1e3:.1f} {unit}"
          f"   ratio {search_step / dense_step:.2f}x (target <= 1.5x)")
    print(f"[bench] inference: dense {dense_inf * 1e3:.1f} {unit}   folded ticket (s={max(args.sparsities):g}) "
          f"{ticket_inf * 1e3:.1f} {unit}   ratio {ticket_inf / dense_inf:.2f}x", flush=True)
    return {"search_over_dense": search_step / dense_step, "ticket_over_dense_inference": ticket_inf / dense_inf}


def seconds_per_step(model, batches, run, adversary):
    """Mean wall-clock of one optimiser step (FreeLB when adversary.steps > 0) over `batches` after the first
    (warm-up); the same list of batches for every model timed, so they do identical work."""
    from early_bird_adv import sync_time

    model.to(run.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for i, batch in enumerate(batches):
        if i == 1:
            start = sync_time(run.device)
        batch = {k: v.to(run.device) for k, v in batch.items()}
        adversarial_backward(model, batch, adversary, cross_entropy, "freelb", run.autocast)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (sync_time(run.device) - start) / max(1, len(batches) - 1)


# ---- early_bird_adv.py --bench: time-to-ticket vs FreeLB, projected with the measured step costs -------------------
def bench_early_bird(args):
    """A real search (until the masks converge or the cap), then FreeLB steps of the dense model and plain steps of
    the pruned ticket on the same batches; the speed-up projected over the fine-tuning budget (early_bird_adv.speedup,
    the cost model of the README), and ticket vs dense inference."""
    from early_bird_adv import (GatedBert, flops_per_token, fresh_model, inference_throughput, prune_model,
                                search_ticket, setup, speedup, ticket_masks)

    run, data, _, loaders, adversary = setup(args)
    train, test = loaders["train"], loaders["test"]
    dense_model = fresh_model(args, data.num_labels, train)
    batches = [b for _, b in zip(range(args.bench_steps + 1), iter(train))]
    freelb_step = seconds_per_step(dense_model, batches, run, adversary)
    dense_throughput = inference_throughput(dense_model, test, run)
    gated = GatedBert(fresh_model(args, data.num_labels))
    search = search_ticket(gated, train, run, args, adversary)
    ticket = prune_model(gated.remove(), search["head_keep"], search["ffn_keep"])
    ticket_step = seconds_per_step(ticket, batches, run, type(adversary)(steps=0))  # plain CE, the same batches
    budget = args.epochs * len(train)
    out = {"search_seconds": search["seconds"], "draw_epoch": search["draw_epoch"], "stop_epoch": search["stop_epoch"],
           "converged": search["converged"], "freelb_seconds_per_step": freelb_step,
           "ticket_ce_seconds_per_step": ticket_step, "search_in_freelb_steps": search["seconds"] / freelb_step,
           "projected_freelb_seconds": freelb_step * budget,
           "projected_ticket_seconds": search["seconds"] + ticket_step * budget,
           "inference_speedup": inference_throughput(ticket, test, run) / dense_throughput,
           "flops_ratio": flops_per_token(ticket, args.max_seq_length) / flops_per_token(dense_model,
                                                                                         args.max_seq_length),
           "params_ratio": count_params(ticket)["total"] / count_params(dense_model)["total"]}
    out["projected_speedup"] = speedup(out["projected_freelb_seconds"], search["seconds"], 0.0, ticket_step * budget)
    out.update({k: search[k] for k in ("lr_share_at_draw", "lr_share_at_stop", "stopped_at_cap", "schedule_steps")},
               budget_steps=budget, search_steps=search["stop_step"])
    for k, v in out.items():
        print(f"[bench] {k:<28} {v:.4g}" if isinstance(v, float) else f"[bench] {k:<28} {v}", flush=True)
    record = {k: v for k, v in search.items() if k not in ("head_keep", "ffn_keep", "head_gates", "ffn_gates",
                                                           "final_gates")}
    with open(os.path.join(run.dir, "bench.json"), "w") as f:  # report.py plots its search like a run's
        json.dump({**out, "seed": args.seed, "search": record,
                   "ticket": ticket_masks(search["head_keep"], search["ffn_keep"])}, f, indent=2)
    run.writer.close()


def examples_per_second(model, tokenizer, texts, args, run, repeats: int = 3) -> float:
    """Inference throughput of `model` through attacks.Predictor (the attacks' query path) on `texts`: best of
    `repeats` passes after a warm-up batch, so load spikes do not count."""
    predict = Predictor(model, tokenizer, args.max_seq_length, args.eval_batch_size, run.device, run.autocast)
    predict(texts[: args.eval_batch_size])  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.time()
        predict(texts)
        seconds.append(time.time() - start)
    return len(texts) / max(min(seconds), 1e-9)


def speed_vs_teacher(model, teacher, tokenizer, texts, args, run) -> dict:
    """examples_per_second of `model`, then of `teacher` right after (under the same machine load), and the ratio."""
    speed = examples_per_second(model, tokenizer, texts, args, run)
    teacher_speed = speed if model is teacher else examples_per_second(teacher, tokenizer, texts, args, run)
    return {"examples_per_s": speed, "teacher_examples_per_s": teacher_speed,
            "speedup_vs_teacher": speed / teacher_speed}


# ---- rosearch.py --bench: seconds per evaluated candidate (KD + probe attack), student vs teacher inference ---------
def bench_rosearch(args):
    """The raw --model as teacher (the timings do not depend on its training) and, unless given, 1000 train / 200 dev
    examples and a DeepWordBug probe on 100 dev sentences: CPU-friendly."""
    import random

    from rosearch import Context, train_and_score

    args.max_train_examples = args.max_train_examples or 1000
    args.max_eval_examples = args.max_eval_examples or 200
    args.fitness_attack = args.fitness_attack or "deepwordbug"
    args.probe_examples = args.probe_examples or 100
    ctx = Context(args)
    rng = random.Random(args.seed)
    records = [train_and_score(ctx.space.random_genotype(rng), ctx, args.proxy_epochs, "bench")
               for _ in range(args.bench_candidates)]
    kd, pr = np.mean([r["kd_seconds"] for _, r in records]), np.mean([r["probe_seconds"] for _, r in records])
    texts = texts_of(ctx.data, ctx.data.dev)[: args.speed_examples]
    inference = speed_vs_teacher(records[0][0], ctx.teacher, ctx.tokenizer, texts, args, ctx.run)
    print(f"bench: {kd + pr:.2f} s per evaluated candidate (KD {kd:.2f} s + probe {args.fitness_attack} {pr:.2f} s, "
          f"{len(ctx.encoded['train'])} train / {len(ctx.probe_samples)} probe examples); inference student "
          f"{inference['examples_per_s']:.0f} ex/s vs teacher {inference['teacher_examples_per_s']:.0f} ex/s = "
          f"{inference['speedup_vs_teacher']:.2f}x "
          f"(params x{records[0][1]['compression']['total']:.1f} total, "
          f"x{records[0][1]['compression']['non_embedding']:.1f} non-embedding)", flush=True)
    ctx.run.writer.close()


# ---- adapter_mixup.py --bench: one adapter slot's training step vs full fine-tuning's; projected training, passes ----
def bench_adapter_mixup(args):
    """Seconds per training step and trainable parameters: one adapter slot vs full fine-tuning, plus passes."""
    from adapter_mixup import adapter_params, add_adapters, train_only, trainable_share

    set_seed(args.seed)
    device = pick_device(args.cuda)
    data = load_task(args)
    full, tokenizer = load_model(args.model, data.num_labels, args.max_seq_length,
                                 os.path.join(args.output_dir, ".tiny-bert"))
    adapted = copy.deepcopy(full)
    add_adapters(adapted, 1 + len(args.known), args.adapter_type, args.reduction_factor, args.adapter_activation)
    train_only(adapted, 0)  # the mixture uses slot 0 alone
    rows = data.train.select(range(min(len(data.train), args.batch_size)))
    batches = [next(iter(make_loader(tokenize(data, rows, tokenizer, args.max_seq_length), tokenizer,
                                     args.batch_size, False)))] * (args.bench_steps + 1)  # the first warms up
    timer = SimpleNamespace(device=device, autocast=nullcontext)  # what seconds_per_step reads of a Run
    timing = {name: (seconds_per_step(model, batches, timer, Adversary(steps=0)), n) for name, model, n in
              (("full fine-tuning", full, count_params(full)["total"]),
               ("adapter set", adapted, sum(p.numel() for p in adapter_params(adapted, 0))))}
    backbone, m = count_params(full)["total"], len(args.known)
    share = trainable_share(adapted, backbone)
    ratio = timing["adapter set"][0] / timing["full fine-tuning"][0]
    print(f"bench ({args.model}, batch {args.batch_size}, {device}, {args.bench_steps} steps):")
    for name, (seconds, n) in timing.items():
        print(f"  {name:<18} {seconds:8.4f} s/step   trainable {n:>12,} ({100 * n / backbone:.2f}% of backbone)")
    print(f"  adapter / full step time: {ratio:.2f}x; AdpMixup trains 1 + m = {1 + m} adapter sets "
          f"({(1 + m) * share['per_adapter']:,} params, {(1 + m) * share['pct_of_backbone']:.2f}% of backbone incl. "
          f"the pooler dense, {(1 + m) * share['pct_without_pooler']:.2f}% without)")
    # projected training if every attacked example gave one adversarial text (an upper bound); the adversarial
    # generation is the same for both and is left out. Like with like first: every stage at --full-epochs
    n, adv = len(data.train), min(args.adv_train_examples, len(data.train))
    adapter_step, full_step = timing["adapter set"][0], timing["full fine-tuning"][0]

    def steps(examples, epochs):
        return np.ceil(examples / args.batch_size) * epochs

    def new_attack(epochs):  # one more adversarial adapter: on its adversarial data + an equal clean sample
        return adapter_step * steps(2 * adv, epochs)

    def project(clean_epochs, adv_epochs):
        return {"adpmixup": adapter_step * steps(n, clean_epochs) + m * new_attack(adv_epochs),
                "full_at": full_step * steps(n + m * adv, args.full_epochs)}

    projected = {"equal_epochs": project(args.full_epochs, args.full_epochs),
                 "flagged": project(args.epochs, args.adv_epochs)}
    print(f"  projected training at equal epochs ({args.full_epochs:g} for every stage; n={n}, m={m}, {adv} "
          f"adversarial each): AdpMixup {projected['equal_epochs']['adpmixup']:.0f}s vs full AT "
          f"{projected['equal_epochs']['full_at']:.0f}s")
    print(f"  projected training as flagged (clean adapter --epochs {args.epochs:g}, each adversarial adapter "
          f"--adv-epochs {args.adv_epochs:g}, full AT --full-epochs {args.full_epochs:g}): AdpMixup "
          f"{projected['flagged']['adpmixup']:.0f}s, full AT {projected['flagged']['full_at']:.0f}s; a new attack "
          f"costs AdpMixup {new_attack(args.adv_epochs):.0f}s, full AT a full retraining")
    print(f"  inference passes per example: single adapter 1, AdpMixup v1 1, v2 {m + 2} (m + 1 entropies + mix)")
    return {"timing": timing, "ratio": ratio, "trainable_share": share, "projected_seconds": projected}


def main(args):
    from textattack.models.wrappers import HuggingFaceModelWrapper

    validate_common_args(args)
    run = start_run(args, "bench_wrapper")
    data = load_task(args)
    if args.finetuned:
        model, tokenizer = load_model(args.finetuned, data.num_labels, args.max_seq_length)
    else:
        model, tokenizer = load_model(args.model, data.num_labels, args.max_seq_length, run.dir + "/tiny")
        train = make_loader(tokenize(data, data.train, tokenizer, args.max_seq_length), tokenizer, args.batch_size,
                            True, args.seed)
        dev = make_loader(tokenize(data, data.dev, tokenizer, args.max_seq_length), tokenizer, 256, False)
        finetune(model, train, dev, run, args.epochs, args.lr)
    model.to(run.device).eval()  # --finetuned loads on the CPU; without eval() dropout makes outcomes random
    samples = attack_sample(data, args.attack_examples, args.attack_seed)
    predict = Predictor(model, tokenizer, args.max_seq_length, args.eval_batch_size, run.device)
    if args.compare_workers > 1:
        return compare_workers(args, samples, data.text_columns, predict, run.device)
    ours = callable_wrapper(predict)
    stock = HuggingFaceModelWrapper(model, tokenizer)  # pads to tokenizer.model_max_length = --max-seq-length
    print(f"model {args.finetuned or args.model}  max length {tokenizer.model_max_length}  {len(samples)} examples", flush=True)
    print(f"{'attack':<14}{'stock s':>10}{'ours s':>10}{'speed-up':>10}{'same outcome':>14}{'clean':>8}{'aua':>8}")
    for name in args.attacks.split(","):
        t_ours, s_ours, r_ours = timed_attack(name, ours, samples, data.text_columns, args.eval_batch_size)
        t_stock, s_stock, r_stock = timed_attack(name, stock, samples, data.text_columns, args.eval_batch_size)
        same = sum(a == b for a, b in zip(r_ours, r_stock))
        print(f"{name:<14}{t_stock:>10.1f}{t_ours:>10.1f}{t_stock / t_ours:>9.2f}x{same:>9}/{len(samples):<4}"
              f"{s_ours['clean']:>8.1f}{s_ours['aua']:>8.1f}", flush=True)
        if same != len(samples):
            print(f"  note: {len(samples) - same} outcomes differ (float differences between padded and unpadded "
                  f"batches can flip a borderline query)")


if __name__ == "__main__":
    with usage_errors():
        main(parse_args())
