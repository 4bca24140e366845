# Dense baselines of the comparison: plain fine-tuning, and FreeLB adversarial training (Zhu et al., ICLR 2020,
# arXiv 1909.11764) with --adv-steps > 0 — README.md section "Baselines". Also what a distillation method
# (rosearch.py) starts from: the cached fine-tuned teacher and its logits, the KD loss and a student's KD training, a
# dev probe set under attack, and the rows it compares (Distillation).
import argparse
import hashlib
import json
import os
import shutil
import time
from typing import Optional

import torch
import torch.nn.functional as F

from attacks import (Predictor, build_attack, callable_wrapper, evaluate_model, pgd_accuracy, print_summary, run_attack,
                     saved_row, stratified_indices)
from bench import speed_vs_teacher
from common import (add_adversary_args, add_common_args, adversary_from_args, count_params, finetune, finish_run,
                    load_model, load_task, make_loader, results_template, save_atomic, start_run, texts_of, tokenize,
                    usage_errors, validate_common_args, write_json_atomic)
from offline import offline_attack_resources

# every flag the fine-tuning of a cached teacher reads: its cache key (with the data)
TEACHER_FLAGS = ("model", "task", "seed", "lr", "epochs", "batch_size", "eval_batch_size", "max_seq_length", "warmup",
                 "weight_decay", "bf16", "cuda")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Fine-tune a BERT-family classifier (plain, or FreeLB with "
                                     "--adv-steps > 0), then evaluate it under the shared attack protocol.")
    add_common_args(parser, "finetune")
    add_adversary_args(parser, steps=0, lr=0.03, init_mag=0.05)  # TextDefender's FreeLB values, off by default
    parser.add_argument("--save-model", action=argparse.BooleanOptionalAction, default=True,
                        help="save the fine-tuned model (save_pretrained) in the run folder")
    return parser.parse_args(argv)


def train_on_task(model, tokenizer, data, args, run, adversary=None, tag="finetune") -> dict:
    """Fine-tune on train with the common flags (--batch-size --epochs --lr --weight-decay --warmup), best on dev."""
    def loader(split, batch_size, shuffle):
        return make_loader(tokenize(data, split, tokenizer, args.max_seq_length), tokenizer, batch_size,
                           shuffle=shuffle, seed=args.seed)
    return finetune(model, loader(data.train, args.batch_size, True), loader(data.dev, args.eval_batch_size, False),
                    run, args.epochs, args.lr, args.weight_decay, args.warmup, adversary=adversary, tag=tag)


def teacher_cache(args, data, root: str, ready: Optional[str] = None, raw: bool = False) -> str:
    """The cache folder of a teacher and its logits: a key of every flag its fine-tuning reads, and the data."""
    key = [raw, ready and os.path.abspath(ready), [getattr(args, k) for k in TEACHER_FLAGS],
           list(texts_of(data, data.train)), list(data.train["label"]), list(texts_of(data, data.dev))]
    digest = hashlib.sha1(json.dumps(key, default=str).encode()).hexdigest()[:16]
    return os.path.join(root, f"{args.task}_{digest}")


def cached_teacher(args, data, run, root: str, ready: Optional[str] = None, raw: bool = False):
    """A teacher and its train/dev logits, computed once per teacher_cache key under `root`: the fine-tuned folder
    `ready`, the raw --model when `raw`, else --model fine-tuned (train_on_task). The teacher and the logits are
    written under temporary names and renamed, and done.json last: a kill leaves no cache that a later run would
    trust. Returns the teacher, its tokenizer, {train, dev} tokenized with a teacher_logits column (for distillation),
    its dev accuracy (%) and the seconds it took."""
    folder, start = teacher_cache(args, data, root, ready, raw), time.time()
    done = os.path.isfile(os.path.join(folder, "done.json"))
    teacher_dir = ready or (args.model if raw else os.path.join(folder, "teacher"))
    if ready is None and not raw and not done:
        print(f"[teacher] fine-tuning {args.model} (cached in {teacher_dir})", flush=True)
        model, tokenizer = load_model(args.model, data.num_labels, args.max_seq_length, os.path.join(folder, "tiny"))
        train_on_task(model, tokenizer, data, args, run, tag="teacher")
        tmp = f"{teacher_dir}.tmp{os.getpid()}"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(teacher_dir, ignore_errors=True)  # a cut folder of a killed run
        os.replace(tmp, teacher_dir)
    teacher, tokenizer = load_model(teacher_dir, data.num_labels, args.max_seq_length, os.path.join(folder, "tiny"))
    teacher.to(run.device).eval()
    cache = os.path.join(folder, "teacher_logits.pt")
    encoded = {s: tokenize(data, getattr(data, s), tokenizer, args.max_seq_length) for s in ("train", "dev")}
    if done:
        logits = torch.load(cache)
    else:  # the only teacher forward passes over train/dev: a distilled student never runs the teacher
        with torch.no_grad():
            logits = {s: torch.cat([teacher(**{k: v.to(run.device) for k, v in b.items() if k != "labels"}).logits
                                    .float().cpu() for b in make_loader(e, tokenizer, args.eval_batch_size, False)])
                      for s, e in encoded.items()}
        os.makedirs(folder, exist_ok=True)
        save_atomic(logits, cache)
        write_json_atomic(os.path.join(folder, "done.json"), {"teacher": teacher_dir, "flags": list(TEACHER_FLAGS)})
    for s in encoded:
        encoded[s] = encoded[s].add_column("teacher_logits", logits[s].tolist())
    dev_acc = 100.0 * (logits["dev"].argmax(-1) == torch.tensor(data.dev["label"])).float().mean().item()
    print(f"[teacher] dev accuracy {dev_acc:.2f}%{' (--bench: raw --model, not fine-tuned)' if raw else ''} "
          f"(logits cached in {cache})", flush=True)
    return teacher, tokenizer, encoded, dev_acc, time.time() - start


def kd_loss(alpha: float, temperature: float):
    """Logit KD on batches with the teacher_logits column (rosearch spec §4.3):
    L = (1 - alpha) CE(y, z_s) + alpha T^2 KL(softmax(z_t / T) || softmax(z_s / T))."""
    def loss_fn(logits, batch):
        logits = logits.float()
        ce = F.cross_entropy(logits, batch["labels"])
        kl = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(batch["teacher_logits"] / temperature, -1),
                      log_target=True, reduction="batchmean")
        return (1 - alpha) * ce + alpha * temperature ** 2 * kl
    return loss_fn


def add_distillation_args(parser, method: str):
    """The flags Distillation reads; the student's defaults are the rosearch spec's (§4.3)."""
    g = parser.add_argument_group("distillation: teacher, student training and rows (finetune.Distillation)")
    g.add_argument("--teacher", help="folder of a fine-tuned teacher (else --model is fine-tuned with --lr/--epochs)")
    g.add_argument("--cache-dir", help=f"teacher and its cached logits (default OUTPUT_DIR/.{method}_cache)")
    g.add_argument("--speed-examples", type=int, default=256, help="dev sentences timed for inference speed")
    g.add_argument("--kd-alpha", type=float, default=0.8, help="alpha: weight of the soft-target KL term (§4.3)")
    g.add_argument("--kd-temperature", type=float, default=2.0, help="T: distillation temperature (§4.3)")
    g.add_argument("--student-lr", type=float, default=5e-4, help="student learning rate (AdaBERT, §4.3)")
    g.add_argument("--student-weight-decay", type=float, default=3e-4, help="student weight decay (§4.3)")
    g.add_argument("--student-batch-size", type=int, default=64, help="student batch size (§4.3)")


class Distillation:
    """A distillation run's teacher side, its students' KD training, its probe set and its comparison rows. The
    teacher: cached_teacher under --cache-dir (--teacher DIR, else --model fine-tuned; the raw --model when `raw`),
    with its tokenizer, {train, dev} tokenized with teacher logits, its dev accuracy (%) and seconds, a dev loader and
    the attack resources."""

    def __init__(self, args, method: str, run, raw: bool = False):
        self.args, self.method, self.run, self.data = args, method, run, load_task(args)
        cache = args.cache_dir or os.path.join(args.output_dir, f".{method}_cache")
        self.teacher, self.tokenizer, self.encoded, self.teacher_dev, self.teacher_seconds = cached_teacher(
            args, self.data, run, cache, args.teacher, raw)
        self.resources = offline_attack_resources(args.attack_substitutes) if args.attack_substitutes else None
        self.dev_loader = make_loader(self.encoded["dev"], self.tokenizer, args.eval_batch_size, False)

    def distill(self, student, epochs: float, seed: int, tag: str) -> dict:
        """KD-train `student` on train (kd_loss, --kd-alpha/--kd-temperature) with common.finetune and the --student-*
        flags (AdamW, linear schedule, best on dev), batches shuffled by `seed`; returns finetune's summary."""
        args = self.args
        loader = make_loader(self.encoded["train"], self.tokenizer, args.student_batch_size, True, seed)
        return finetune(student, loader, self.dev_loader, self.run, epochs, args.student_lr, args.student_weight_decay,
                        args.warmup, loss_fn=kd_loss(args.kd_alpha, args.kd_temperature), tag=tag)

    def set_probe(self, n: int, seed: int, recipe: str, pgd_radius: float):
        """The fixed probe set of probe_accuracy: n dev sentences, as evenly per label as dev allows (seeded,
        attacks.stratified_indices), attacked by `recipe`: a TextAttack recipe, built once, or embedding-PGD ("pgd")."""
        indices = stratified_indices(self.data.dev["label"], n, seed)
        dev = self.data.dev.select(indices)
        self.probe_samples = list(zip(texts_of(self.data, dev), dev["label"]))
        self.probe_loader = make_loader(self.encoded["dev"].select(indices), self.tokenizer, self.args.eval_batch_size,
                                        False)
        self.probe_recipe, self.probe_pgd_radius = recipe, pgd_radius
        self.probe_predict = self.probe_attack = None  # the Predictor of the model being probed; its attack

    def probe_accuracy(self, model) -> tuple:
        """(accuracy under attack on the probe set, % of its clean-correct sentences the attack did not fool: None
        under pgd), both in %."""
        args, run = self.args, self.run
        if self.probe_recipe == "pgd":
            aua = pgd_accuracy(model, self.probe_loader, run.device, self.probe_pgd_radius, autocast=run.autocast)
            return 100.0 * aua, None
        self.probe_predict = Predictor(model, self.tokenizer, args.max_seq_length, args.eval_batch_size, run.device,
                                       run.autocast)
        if self.probe_attack is None:  # built once; it queries whichever model is being probed
            self.probe_attack = build_attack(self.probe_recipe, callable_wrapper(lambda t: self.probe_predict(t)),
                                             self.resources, args.attack_query_budget, args.attack_max_modify_rate,
                                             args.eval_batch_size)
        summary, _ = run_attack(self.probe_attack, self.probe_samples, self.data.text_columns, None, desc="probe")
        return summary["aua"], 100.0 - summary["suc"]

    def row(self, name: str, setting: str, model, dev_accuracy: float, extra: Optional[dict] = None) -> dict:
        """A results row of `model`, evaluated like every row (attacks.evaluate_model, CSVs prefixed `{name}_`),
        with its compression and inference speed (--speed-examples dev sentences) vs the teacher. Saved to
        rows/{name}_.json as it finishes: a resumed run reads it back instead of attacking again (attacks.saved_row)."""
        def evaluate():
            args, teacher = self.args, count_params(self.teacher)
            start, row = time.time(), results_template(args, self.method, setting, model)
            ratio = {k: teacher[k] / max(row["params"][k], 1) for k in ("total", "non_embedding")}
            row.update(dev_accuracy=dev_accuracy, compression=ratio["total"],
                       extra={"compression": ratio, **(extra or {})})
            evaluate_model(model, self.tokenizer, self.data, args, self.run, row, f"{name}_", resources=self.resources)
            texts = texts_of(self.data, self.data.dev)[: args.speed_examples]
            row["extra"]["inference"] = speed_vs_teacher(model, self.teacher, self.tokenizer, texts, args, self.run)
            row["wall_clock"]["evaluation"] = time.time() - start
            return row
        return saved_row(os.path.join(self.run.dir, "rows", f"{name}_.json"), f"{name}_", evaluate)

    def finish(self, rows: list, **extra):
        """results.json: the first row, with the teacher's seconds and the other rows and `extra` in its extra."""
        rows[0]["wall_clock"]["teacher"] = self.teacher_seconds
        rows[0]["extra"].update(rows=rows[1:], **extra)
        finish_run(self.run, rows[0])
        print_summary([(r["setting"], r) for r in rows])


def main(args):
    validate_common_args(args)
    adversary = adversary_from_args(args)
    method = "freelb" if adversary.steps > 0 else "finetune"
    run = start_run(args, method)
    data = load_task(args)
    model, tokenizer = load_model(args.model, data.num_labels, args.max_seq_length, run.dir + "/tiny")
    print(f"[{method}] train {len(data.train)}  dev {len(data.dev)}  test {len(data.test)}", flush=True)
    fit = train_on_task(model, tokenizer, data, args, run, adversary, method)
    results = results_template(args, method, "FreeLB" if adversary.steps > 0 else "fine-tune", model)
    results["wall_clock"]["train"] = fit["seconds"]
    results["dev_accuracy"] = 100.0 * fit["dev_accuracy"]
    if args.save_model:
        model.save_pretrained(f"{run.dir}/model")
        tokenizer.save_pretrained(f"{run.dir}/model")
    start = time.time()
    evaluate_model(model, tokenizer, data, args, run, results)
    results["wall_clock"]["evaluate"] = time.time() - start
    finish_run(run, results)
    return results


if __name__ == "__main__":
    with usage_errors():
        main(parse_args())
