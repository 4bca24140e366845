# The shared attack protocol (docs/protocol.md): TextAttack recipes against a method's whole
# predictor on one seeded sample of the test split; per-example seeds, CSV rows written as they finish (a killed run
# resumes), the configuration and per-example outcomes recorded next to every number so report.py compares like with
# like and pairs rows example by example. Methods call evaluate_model (or evaluate_robustness for a custom predictor).
import copy
import csv
import io
import json
import logging
import os
import sys
import time
import traceback
from collections import OrderedDict
from contextlib import nullcontext
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

import offline
from common import (ATTACK_RECIPES, RECIPE_FAILURES, Adversary, Run, TaskData, UsageError, _logits,
                    adversarial_backward, append_jsonl, auroc, count_params, finetune, finish_run, fingerprint,
                    load_checkpoint, load_model, make_loader, open_jsonl, parse_attacks, parse_shard, predict_labels,
                    read_jsonl, rows_accuracy, rows_loader, save_atomic, set_seed, texts_of, tokenize,
                    write_json_atomic)


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


class Predictor:
    """list[str | (str, str)] -> logits (numpy): batches queries, pads each batch to its own longest sequence."""

    def __init__(self, model, tokenizer, max_length: int, batch_size: int, device, autocast=nullcontext):
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.batch_size, self.device, self.autocast = batch_size, device, autocast

    def to(self, device):
        """Move the model (a spawned GPU attack worker's copy) to `device`."""
        self.model.to(device)
        self.device = device
        return self

    def batches(self, texts):
        """The tokenised batches of `texts` on the device, each padded to its own longest sequence."""
        for i in range(0, len(texts), self.batch_size):
            chunk = list(texts[i: i + self.batch_size])
            pair = isinstance(chunk[0], (tuple, list))
            args = ([t[0] for t in chunk], [t[1] for t in chunk]) if pair else (chunk,)
            yield self.tokenizer(*args, truncation=True, max_length=self.max_length, padding=True,
                                 return_tensors="pt").to(self.device)

    def logits(self, enc):
        """Float logits of one tokenised batch."""
        with self.autocast():
            return _logits(self.model(**enc)).float()

    @torch.no_grad()
    def __call__(self, texts):
        self.model.eval()
        return torch.cat([self.logits(enc).cpu() for enc in self.batches(texts)]).numpy()


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


def import_textattack():
    """Import TextAttack offline-safe and quiet; undo the cache variable it exports to every child process."""
    offline.prepare_textattack_offline()
    import textattack

    os.environ.pop("PYTORCH_TRANSFORMERS_CACHE", None)  # else every later `import transformers` warns (deprecated)
    textattack.shared.logger.setLevel(logging.ERROR)  # not "Unknown if model of class ... compatible" (a warning)
    return textattack


def build_attack(name: str, model_wrapper, resources=None, query_budget=None, max_modify_rate=None,
                 model_batch_size: int = 128):
    """A TextAttack recipe by its CLI name; stock, unless `resources` (offline.AttackResources) injects substitutes."""
    textattack = import_textattack()
    from textattack.constraints.overlap import MaxWordsPerturbed

    if name not in ATTACK_RECIPES:
        raise UsageError(f"unknown attack '{name}'; choose from: {', '.join(ATTACK_RECIPES)}")
    attack = offline.build_with_resources(getattr(textattack.attack_recipes, ATTACK_RECIPES[name]), model_wrapper,
                                          resources)
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


def stratified_indices(labels, n: int, seed: int) -> np.ndarray:
    """n indices, as equal per label as the data allow, seeded; sorted. A random sample of 20 can be 70 % one class."""
    rng, labels = np.random.default_rng(seed), np.asarray(labels)
    pools = {c: rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)}
    taken, chosen = {c: 0 for c in pools}, []
    while len(chosen) < min(n, len(labels)):
        for c in sorted(pools, key=lambda c: taken[c]):  # the class with fewest picks first
            if taken[c] < len(pools[c]) and len(chosen) < n:
                chosen.append(pools[c][taken[c]])
                taken[c] += 1
    return np.sort(np.array(chosen, dtype=int))


def paired_interval(a, b, n_boot: int = 2000, seed: int = 0) -> tuple:
    """(mean of a - b in points, 95 % bootstrap interval) for two 0/1 arrays over the same examples (paired)."""
    diff = 100.0 * (np.asarray(a, dtype=float) - np.asarray(b, dtype=float))
    rng = np.random.default_rng(seed)
    boots = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(1)
    return float(diff.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def example_seed(attack_seed: int, index: int) -> int:
    """The seed example `index` of the seeded sample is attacked under: its outcome depends on nothing else."""
    return (attack_seed * 1_000_003 + index) % (2 ** 31 - 1)


OUTCOME = {"Successful": "S", "Failed": "F", "Skipped": "K"}  # F: the attack failed, the example is robust
CSV_FIELDS = ["index", "seed", "result", "ground_truth", "original_output", "perturbed_output", "num_queries",
              "perturbed_words", "original_text", "perturbed_text"]


def attack_one(attack, text, label: int, column_names: tuple, seed: int) -> dict:
    """One example under its own seed, with the recipe's caches cleared: a per-example CSV row."""
    from textattack.attack_results import SkippedAttackResult, SuccessfulAttackResult

    set_seed(seed)
    attack.clear_cache()
    example = OrderedDict(zip(column_names, text)) if isinstance(text, (tuple, list)) else text
    start = time.time()
    result = attack.attack(example, int(label))
    original, perturbed = result.original_result.attacked_text, result.perturbed_result.attacked_text
    changed = len(original.all_words_diff(perturbed)) if isinstance(result, SuccessfulAttackResult) else 0
    return {"seed": seed, "result": type(result).__name__.replace("AttackResult", ""), "ground_truth": int(label),
            "original_output": int(result.original_result.output),
            "perturbed_output": int(result.perturbed_result.output),
            "num_queries": 0 if isinstance(result, SkippedAttackResult) else int(result.perturbed_result.num_queries),
            "perturbed_words": 100.0 * changed / max(1, len(original.words)),
            "original_text": original.printable_text(), "perturbed_text": perturbed.printable_text(),
            # not in the CSV: the model input itself (a pair stays a tuple) and the time, for adversarial training data
            "perturbed_input": perturbed.tokenizer_input, "seconds": time.time() - start}


def summarise_attack(rows: list) -> dict:
    """TextAttack's summary metrics (percentages) from per-example rows, plus what the report pairs and checks:
    the outcome of each example in sample order (S successful, F failed = robust, K skipped = misclassified) and the
    histograms of predictions and labels on the sample."""
    outcomes = "".join(OUTCOME.get(r["result"], "?") for r in rows)
    n, skipped, failed, succeeded = len(rows), outcomes.count("K"), outcomes.count("F"), outcomes.count("S")
    queries = [int(r["num_queries"]) for r, o in zip(rows, outcomes) if o != "K"]
    perturbed = [float(r["perturbed_words"]) for r, o in zip(rows, outcomes) if o == "S"]
    return {
        "n": n,
        "clean": 100.0 * (n - skipped) / max(n, 1),  # TextAttack "Original accuracy"
        "aua": 100.0 * failed / max(n, 1),  # "Accuracy under attack"
        "suc": 100.0 * succeeded / max(succeeded + failed, 1),  # "Attack success rate"
        "queries": float(np.mean(queries)) if queries else 0.0,  # "Avg num queries"
        "perturbed_words": float(np.mean(perturbed)) if perturbed else 0.0,  # "Average perturbed word %"
        "outcomes": outcomes,
        "predictions": np.bincount([int(r["original_output"]) for r in rows]).tolist(),
        "labels": np.bincount([int(r["ground_truth"]) for r in rows]).tolist(),
    }


def valid_row(row: dict) -> bool:
    """A CSV row a killed process finished writing: every field present and parsable."""
    try:
        int(row["index"]), int(row["seed"]), int(row["ground_truth"]), int(row["original_output"])
        int(row["perturbed_output"]), int(row["num_queries"]), float(row["perturbed_words"])
    except (KeyError, TypeError, ValueError):
        return False
    return row["result"] in OUTCOME and row.get("perturbed_text") is not None and None not in row


def read_attack_csv(csv_path: str, key: str) -> dict:
    """Rows already attacked under the same key (recipe, sample, predictor): index -> row. Anything else: {}.
    A line cut by a kill is dropped (that example is attacked again)."""
    meta = csv_path + ".key"
    if not (os.path.isfile(csv_path) and os.path.isfile(meta)):
        return {}
    with open(meta) as f:
        if f.read().strip() != key:
            return {}
    with open(csv_path, newline="") as f:
        text = f.read()
    if not text.endswith("\n"):  # every finished row ends with a line break: the last line was cut
        text = text[: text.rfind("\n") + 1]
    return {int(r["index"]): r for r in csv.DictReader(io.StringIO(text, newline="")) if valid_row(r)}


def read_records(path: str, check: Callable, what: str, kind: str) -> dict:
    """index -> record of a JSONL log a killed run appended to. A line that does not parse, or that check(record)
    rejects by raising, is reported and skipped (that `what` is computed again), never the others. A file without one
    valid line is a UsageError that asks whether it is a `kind`."""
    records, lines = {}, open(path).read().splitlines()
    for n, line in ((n, line) for n, line in enumerate(lines, 1) if line.strip()):
        try:
            record = json.loads(line)
            check(record)
            records[int(record["index"])] = record
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            print(f"warning: {path} line {n} is corrupt ({type(e).__name__}); skipped, that {what} will be "
                  f"re-evaluated", file=sys.stderr, flush=True)
    if not records and any(line.strip() for line in lines):
        raise UsageError(f"--resume: no valid line in {path}; is it a {kind}?")
    return records


def _attack_share(attack, samples, column_names, indices, attack_seed, conn) -> int:
    """A worker's loop: one row per message on its own pipe (a worker killed mid-message cannot block the others)."""
    code = 0
    try:
        for i in indices:
            conn.send((i, attack_one(attack, samples[i][0], samples[i][1], column_names, example_seed(attack_seed, i))))
    except Exception:  # noqa: BLE001 -- reported here; the parent attacks what this worker did not finish
        traceback.print_exc()
        code = 1
    conn.close()
    return code


def attacked_device(attack):
    """The device of the model an attack queries (a Predictor's, a stock wrapper's model's), else the CPU."""
    model = getattr(getattr(attack.goal_function, "model", None), "model", None)
    return getattr(model, "device", None) or "cpu"


def rounded_logits(predict: Callable, texts: list) -> list:
    """The predictor's logits on texts to 3 decimals: what identifies a predictor in attack cache keys."""
    return np.round(np.asarray(predict(texts), dtype=float), 3).tolist()


def own_wordnet_files():
    """A forked child reopens WordNet's data files: the inherited ones share one file offset with the parent and the
    other workers, so a seek in one process moves another's read (PWWS then got None for a synset and raised)."""
    wordnet = getattr(sys.modules.get("nltk.corpus"), "wordnet", None)
    if wordnet is not None and "_data_file_map" in vars(wordnet):  # loaded (a LazyCorpusLoader has no such field)
        wordnet._data_file_map = {}


def _attack_worker(attack, samples, column_names, indices, attack_seed, threads, conn):
    """A forked CPU worker: its own copy of the attack and predictor, `threads` torch threads."""
    import textattack

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the parent's rayon pool does not survive fork (TextAttack sets it)
    textattack.shared.utils.device = torch.device("cpu")  # a forked child must not touch the parent's CUDA context
    torch.set_num_threads(threads)
    own_wordnet_files()
    os._exit(_attack_share(attack, samples, column_names, indices, attack_seed, conn))  # no inherited exit handlers


def _spawned_worker(predict, recipe, samples, column_names, indices, attack_seed, threads, device, conn):
    """A spawned (GPU) worker: the pickled predictor moved to `device`, the recipe rebuilt here around it."""
    torch.set_num_threads(threads)
    predict.to(torch.device(device))
    attack = build_attack(recipe["name"], callable_wrapper(predict), recipe_resources(recipe), recipe["query_budget"],
                          recipe["max_modify_rate"], recipe["batch_size"])
    raise SystemExit(_attack_share(attack, samples, column_names, indices, attack_seed, conn))


def attack_resources(args, resources=None):
    """`resources` if given, else the offline stand-ins that --attack-substitutes names (built once per call), else
    None (the recipes' own resources)."""
    if resources is None and getattr(args, "attack_substitutes", None):
        return offline.offline_attack_resources(args.attack_substitutes)
    return resources


def recipe_resources(recipe: dict):
    """The resources a spawned worker attacks with: rebuilt from --attack-substitutes, else the pickled object."""
    if recipe.get("substitutes"):
        return offline.offline_attack_resources(recipe["substitutes"])
    return recipe.get("resources")


def worker_devices(workers: int, device) -> list:
    """Worker w's device: CPU for all, or visible GPU w mod n (the indices CUDA_VISIBLE_DEVICES exposes)."""
    if torch.device(device).type != "cuda":
        return ["cpu"] * workers
    n = torch.cuda.device_count()
    if n < 1:
        raise UsageError("--attack-workers on CUDA: no visible GPU (CUDA_VISIBLE_DEVICES)")
    return [f"cuda:{w % n}" for w in range(workers)]


def attack_in_workers(attack, samples, column_names, todo, attack_seed, workers: int, desc: str, spawn=None):
    """Yield (index, row) for every index in todo, attacked by `workers` processes (strided shares): forked CPU
    copies of `attack`, or with spawn = (predictor, recipe dict, devices) spawned processes that rebuild the recipe
    around the pickled predictor on their device (CUDA cannot be forked). A worker that dies is reported and its
    unfinished examples are attacked here, so none is dropped."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    # A forked child cannot use its parent's CUDA context, but forking a process that used CUDA is fine as long as
    # the children stay on the CPU (TextAttack or a CPU run on a GPU machine may have touched CUDA): refuse only a
    # CUDA predictor, whose workers must be spawned.
    if spawn is None and torch.cuda.is_initialized() and torch.device(attacked_device(attack)).type == "cuda":
        raise UsageError("--attack-workers: a CUDA predictor cannot be attacked in forked workers (spawned ones "
                         "need the predictor and recipe: evaluate_robustness passes them)")
    ctx = mp.get_context("fork" if spawn is None else "spawn")
    threads = max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // workers))
    procs, readers = [], []
    for w, share in enumerate(todo[w::workers] for w in range(workers)):
        if share:
            reader, writer = ctx.Pipe(duplex=False)
            if spawn is None:
                target, args = _attack_worker, (attack, samples, column_names, share, attack_seed, threads, writer)
            else:
                predict, recipe, devices = spawn
                target, args = _spawned_worker, (predict, recipe, samples, column_names, share, attack_seed,
                                                 threads, devices[w], writer)
            procs.append(ctx.Process(target=target, args=args, daemon=True))
            procs[-1].start()
            writer.close()  # the parent keeps only the read end: a dead worker's pipe then ends (EOFError)
            readers.append(reader)
    left = set(todo)
    bar = tqdm(total=len(todo), desc=f"{desc} x{len(procs)}", leave=False, disable=None)
    try:
        while readers:
            for reader in wait(readers):
                try:
                    i, row = reader.recv()
                except (EOFError, OSError):  # finished, or died (possibly in the middle of a message)
                    readers.remove(reader)
                    continue
                left.discard(i)
                bar.update(1)
                yield i, row
    finally:
        bar.close()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    dead = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    if left:
        print(f"warning: [{desc}] {len(dead)} attack worker(s) died (exit codes {dead}): attacking their "
              f"{len(left)} unfinished examples in the main process", flush=True)
        for i in sorted(left):
            yield i, attack_one(attack, samples[i][0], samples[i][1], column_names, example_seed(attack_seed, i))


def attack_each(attack, samples: list, column_names: tuple, todo: list, attack_seed: int, workers: int = 1,
                desc: str = "attack", spawn=None):
    """Yield (i, attack_one row) for each i in todo, each under example_seed(attack_seed, i): in this process, or in
    `workers` processes (attack_in_workers) in the order they finish."""
    if workers > 1 and len(todo) > 1:
        yield from attack_in_workers(attack, samples, column_names, todo, attack_seed, workers, desc, spawn)
        return
    for i in tqdm(todo, desc=desc, leave=False, disable=None):
        yield i, attack_one(attack, samples[i][0], samples[i][1], column_names, example_seed(attack_seed, i))


def run_attack(attack, samples: list, column_names: tuple, csv_path: Optional[str] = None, desc: str = "attack",
               attack_seed: int = 0, key: str = "", indices=None, workers: int = 1, spawn=None):
    """Attack samples[i] for i in `indices` (default: all), each under example_seed(attack_seed, i), in this process
    or in `workers` forked ones. Rows go to the per-example CSV as they finish; examples already in a CSV with the
    same `key` are not attacked again (resume). Returns (summary dict, rows in sample order)."""
    indices = list(range(len(samples))) if indices is None else list(indices)
    done = read_attack_csv(csv_path, key) if csv_path else {}
    todo = [i for i in indices if i not in done]
    if done and todo != indices:
        print(f"[{desc}] resuming: {len(indices) - len(todo)} of {len(indices)} examples already in {csv_path}",
              flush=True)
    out = None
    if csv_path:  # rewritten with the rows kept (a line cut by a kill is gone), then appended to row by row
        with open(csv_path + ".key", "w") as f:
            f.write(key)
        out = open(csv_path, "w", newline="")
        writer = csv.DictWriter(out, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(done[i] for i in sorted(done))
        out.flush()
    finished = attack_each(attack, samples, column_names, todo, attack_seed, workers, desc, spawn)
    try:
        for i, row in finished:
            done[i] = {"index": i, **{k: v for k, v in row.items() if k in CSV_FIELDS}}  # the CSV row, nothing else
            if out is not None:
                writer.writerow(done[i])
                out.flush()
    finally:
        if out is not None:
            out.close()
    rows = [done[i] for i in indices]
    return summarise_attack(rows), rows


def attack_config(args, name: str, resources, samples: list) -> dict:
    """Everything an Aua depends on besides the predictor: only rows that agree on all of it are comparable."""
    substituted = resources is not None and name in offline.SUBSTITUTABLE
    return {"recipe": ATTACK_RECIPES[name], "attack_seed": args.attack_seed, "n_requested": args.attack_examples,
            "resources": getattr(resources, "label", "injected") if substituted else "real",
            "query_budget": args.attack_query_budget, "max_modify_rate": args.attack_max_modify_rate,
            "max_seq_length": args.max_seq_length, "sample": fingerprint([list(map(str, s)) for s in samples])}


def spawn_spec(predict, name: str, resources, args, device, workers: int):
    """None (fork CPU workers, or one process), or what spawned GPU workers need: (predictor, recipe, devices)."""
    if workers < 2 or torch.device(device).type != "cuda":
        return None
    if not hasattr(predict, "to"):
        raise UsageError("--attack-workers on CUDA needs a predictor with .to(device) (attacks.Predictor has one)")
    substitutes = getattr(args, "attack_substitutes", None)
    recipe = {"name": name, "substitutes": substitutes, "resources": None if substitutes else resources,
              "query_budget": args.attack_query_budget, "max_modify_rate": args.attack_max_modify_rate,
              "batch_size": args.eval_batch_size}
    return predict, recipe, worker_devices(workers, device)


def attack_seeded_rows(predict: Callable, name: str, rows: list, n: int, args, run: Run, resources, column_names,
                       tag: str) -> list:
    """Robust (True: the attack failed) or not, per example, of n seeded (input, label) rows under recipe `name` run
    on `predict`. One CSV per (predictor, recipe, sample) in the run folder, {tag}_{name}_{key}.csv: a resumed run
    reads it back instead of attacking again."""
    rng = np.random.default_rng(args.attack_seed)
    sample = [rows[i] for i in np.sort(rng.choice(len(rows), size=min(n, len(rows)), replace=False))]
    attack = build_attack(name, callable_wrapper(predict), resources, args.attack_query_budget,
                          args.attack_max_modify_rate, args.eval_batch_size)
    key = fingerprint([rounded_logits(predict, [t for t, _ in sample]),
                       attack_config(args, name, resources, sample)])
    spawn = spawn_spec(predict, name, resources, args, run.device, args.attack_workers)
    summary, _ = run_attack(attack, sample, column_names, os.path.join(run.dir, f"{tag}_{name}_{key[:12]}.csv"),
                            f"{tag} {name}", args.attack_seed, key, None, args.attack_workers, spawn)
    return [o == "F" for o in summary["outcomes"]]


# ---- Adversarial examples as data (adapter_mixup.py's training and transfer sets): a resumable JSONL cache ----------
def adversarial_key(name: str, weights: str, samples: list, args, resources, version: int) -> str:
    """The cache key of `samples` attacked with recipe `name`: all the records depend on, i.e. the attacked model's
    weights (a fingerprint), the sample, budget, length, seed, resources and the cache format's `version`."""
    return fingerprint([name, weights, samples, args.attack_query_budget, args.attack_max_modify_rate,
                        args.max_seq_length, args.attack_seed, getattr(resources, "label", None) or "real",
                        args.attack_substitutes and os.path.abspath(args.attack_substitutes), version])


def generate_adversarial(name: str, predict: Callable, samples: list, column_names: tuple, path: str, args,
                         resources=None) -> list:
    """Attack every (input, label) in samples, each under its own seed (attack_one), in --attack-workers processes;
    one JSONL record per finished example, so a rerun resumes. Returns the records in sample order."""
    records = read_jsonl(path)
    todo = [i for i in range(len(samples)) if i not in records]
    if records:
        print(f"[adv-gen] {name}: {len(records)} cached examples in {path}, {len(todo)} to attack", flush=True)
    if todo:
        attack = build_attack(name, callable_wrapper(predict), resources, args.attack_query_budget,
                              args.attack_max_modify_rate, args.eval_batch_size)
        spawn = spawn_spec(predict, name, resources, args, predict.device, args.attack_workers)
        finished = attack_each(attack, samples, column_names, todo, args.attack_seed, args.attack_workers,
                               f"adv-gen {name}", spawn)
        with open_jsonl(path) as f:
            for i, row in finished:
                text, label = samples[i]
                perturbed = row["perturbed_input"]
                records[i] = {"index": i, "label": int(label), "status": row["result"].lower(),
                              "original": text if isinstance(text, str) else list(text),  # pairs as lists
                              "perturbed": perturbed if isinstance(perturbed, str) else list(perturbed),
                              "seconds": row["seconds"]}
                append_jsonl(f, records[i])
    return [records[i] for i in range(len(samples))]


def adversarial_rows(kind: str, name: str, predict: Callable, weights: str, samples: list, column_names: tuple,
                     cache_dir: str, args, resources=None, version: int = 0, against: str = "the model") -> tuple:
    """generate_adversarial cached as {cache_dir}/{kind}_{name}_{adversarial_key}.jsonl (`weights`: the fingerprint
    of the attacked predictor's weights), summarised: (counts, success rate, cache path and seconds; the successful
    examples as (perturbed input, label) rows)."""
    key = adversarial_key(name, weights, samples, args, resources, version)
    path = os.path.join(cache_dir, f"{kind}_{name}_{key}.jsonl")
    os.makedirs(cache_dir, exist_ok=True)
    start, records = time.time(), generate_adversarial(name, predict, samples, column_names, path, args, resources)
    counts = {s: sum(r["status"] == s for r in records) for s in ("successful", "failed", "skipped")}
    summary = {**counts, "attacked": len(records), "cache": path,
               "seconds": sum(r.get("seconds", 0.0) for r in records),  # the generation cost, also from the cache
               "seconds_this_run": time.time() - start,
               "success_rate": 100.0 * counts["successful"] / max(1, counts["successful"] + counts["failed"])}
    print(f"[{kind} {name}] against {against}: {summary['successful']} successful / {summary['failed']} failed / "
          f"{summary['skipped']} skipped of {summary['attacked']} ({summary['seconds']:.0f}s)", flush=True)
    pair = len(column_names) > 1
    return summary, [(tuple(r["perturbed"]) if pair else r["perturbed"], r["label"]) for r in records
                     if r["status"] == "successful"]


def cached_training(cache_dir: str, kind: str, config: dict, label: str, train: Callable, load: Callable) -> dict:
    """A training run cached as {cache_dir}/{kind}_{fingerprint of config}.pt ({state, stats, config}): its state
    given to load(state) and its stats returned (stats["cached"]: the path), or, when that file is absent, cut or
    unreadable, train() -> (stats, state) run and saved atomically. Returns the stats."""
    path = os.path.join(cache_dir, f"{kind}_{fingerprint(config)}.pt")
    saved = load_checkpoint(path)
    if saved is not None:
        load(saved["state"])
        print(f"{label} loaded from {path}", flush=True)
        return {**saved["stats"], "cached": path}
    stats, state = train()
    os.makedirs(cache_dir, exist_ok=True)
    save_atomic({"state": state, "stats": stats, "config": config}, path)
    return stats


def transfer_rows(predict: Callable, weights: str, data: TaskData, cache_dir: str, args, resources=None,
                  version: int = 0, against: str = "the model") -> tuple:
    """Fixed adversarial test inputs made against `predict`: every --attacks recipe on the seeded test sample, cached
    as adversarial_rows ("transfer" files). Returns ({recipe: counts}, {recipe: successful rows})."""
    samples = attack_sample(data, args.attack_examples, args.attack_seed)
    counts, rows = {}, {}
    for name in parse_attacks(args.attacks):
        counts[name], rows[name] = adversarial_rows("transfer", name, predict, weights, samples, data.text_columns,
                                                    cache_dir, args, resources, version, against)
    return counts, rows


def successful_rows(run_dir: str, robust: dict, data: TaskData) -> dict:
    """{recipe: the successful (perturbed text, label) rows of its CSV} of evaluate_robustness's metrics `robust`,
    a recipe that raised left out; single-text tasks only ({} otherwise: the CSV holds printable text)."""
    if len(data.text_columns) > 1:
        return {}
    rows = {}
    for name, metrics in ((name, m) for name, m in robust.items() if "error" not in m):
        with open(os.path.join(run_dir, metrics["csv"]), newline="") as f:
            rows[name] = [(r["perturbed_text"], int(r["ground_truth"])) for r in csv.DictReader(f)
                          if r["result"] == "Successful"]
    return rows


def evaluate_robustness(predict: Callable, data: TaskData, args, run: Run, prefix: str = "", resources=None,
                        row: Optional[dict] = None) -> dict:
    """Every --attacks recipe on the seeded test sample against the whole predictor. Returns {attack: metrics}.
    With `row` (the results row being evaluated), row["attacks"] fills recipe by recipe and results.json is rewritten
    after each one; a recipe that raises is recorded as {"error": ...} and the next one still runs."""
    names = parse_attacks(args.attacks)
    metrics = {} if row is None else row.setdefault("attacks", {})
    if row is not None:
        row["data"] = data.identity
        run.track(prefix, row)
    if not names:
        return metrics  # --attacks none: TextAttack is never imported
    resources = attack_resources(args, resources)
    samples = attack_sample(data, args.attack_examples, args.attack_seed)
    shard = parse_shard(getattr(args, "attack_shard", None))
    indices = range(shard[0], len(samples), shard[1]) if shard else None
    # the predictor's rounded logits on the sample: shards of one predictor merge, shards of two never do
    predictor = fingerprint(rounded_logits(predict, [s[0] for s in samples]))
    wrapper = callable_wrapper(predict)
    workers = getattr(args, "attack_workers", 1)
    for name in names:
        start = time.time()
        config = {**attack_config(args, name, resources, samples), "predictor": predictor,
                  "shard": list(shard) if shard else None}
        csv_path = os.path.join(run.dir, f"attack_{prefix}{name}.csv")
        try:
            attack = build_attack(name, wrapper, resources, args.attack_query_budget, args.attack_max_modify_rate,
                                  args.eval_batch_size)
            summary, _ = run_attack(attack, samples, data.text_columns, csv_path, f"{prefix}{name}", args.attack_seed,
                                    key=fingerprint([config, prefix]), indices=indices, workers=workers,
                                    spawn=spawn_spec(predict, name, resources, args, run.device, workers))
        except Exception as e:  # noqa: BLE001 -- one recipe's failure must not lose the others (docs/protocol.md)
            traceback.print_exc()
            metrics[name] = {**config, "error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
            RECIPE_FAILURES.append(f"{prefix}{name}: {metrics[name]['error']}")
            print(f"[attack {prefix}{name}] FAILED: {metrics[name]['error']}", flush=True)
            run.checkpoint()
            continue
        metrics[name] = {**config, **summary, "seconds": time.time() - start, "csv": os.path.basename(csv_path)}
        for k in ("clean", "aua", "suc", "queries"):
            run.writer.add_scalar(f"robust/{prefix}{name}_{k}", summary[k], 0)
        print(f"[attack {prefix}{name}] n={summary['n']} clean {summary['clean']:.1f}%  aua {summary['aua']:.1f}%  "
              f"suc {summary['suc']:.1f}%  queries {summary['queries']:.1f}  ({metrics[name]['seconds']:.0f}s)",
              flush=True)
        run.checkpoint()
    return metrics


def evaluate_model(model, tokenizer, data: TaskData, args, run: Run, results: dict, prefix: str = "",
                   predict: Optional[Callable] = None, resources=None) -> dict:
    """Clean test accuracy and prediction histogram, optional embedding-PGD accuracy and every attack; fills
    `results` in place (results.json is written before the attacks and after each one)."""
    test_loader = make_loader(tokenize(data, data.test, tokenizer, args.max_seq_length), tokenizer,
                              args.eval_batch_size, shuffle=False)
    predictions, labels = predict_labels(model, test_loader, run.device, run.autocast)
    results["clean_accuracy"] = 100.0 * float(np.mean(predictions == labels))
    results["test_predictions"] = np.bincount(predictions, minlength=data.num_labels).tolist()
    results["test_labels"] = np.bincount(labels, minlength=data.num_labels).tolist()
    print(f"[eval {prefix or 'model'}] clean test accuracy {results['clean_accuracy']:.2f}% "
          f"(n={len(data.test)}; predictions per class {results['test_predictions']})", flush=True)
    if args.pgd_radius > 0:
        results["pgd_accuracy"] = 100.0 * pgd_accuracy(model, test_loader, run.device, args.pgd_radius,
                                                        autocast=run.autocast)
    predict = predict or Predictor(model, tokenizer, args.max_seq_length, args.eval_batch_size, run.device,
                                   run.autocast)
    evaluate_robustness(predict, data, args, run, prefix, resources, row=results)
    return results


def saved_row(path: str, label: str, evaluate: Callable) -> dict:
    """evaluate() once: the row is saved to `path` as it finishes, and a resumed run reads it back (no attack twice)."""
    if os.path.isfile(path):
        print(f"[{label}] evaluated before the resume: {path}", flush=True)
        return json.load(open(path))
    row = evaluate()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json_atomic(path, row)
    return row


# ---- Several predictors of one run as results rows (adapter_mixup.py; any script that evaluates more than one) -----
def write_csv(path: str, rows: list):
    """A list of dicts with the same keys as a CSV with a header (e.g. a curve report.py plots); none if it is empty."""
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def finetune_rows(model, tokenizer, data: TaskData, train_rows: list, dev_rows: list, run: Run, args, epochs: float,
                  lr: float, tag: str, seed: Optional[int] = None, params=None) -> dict:
    """common.finetune on (input, label) rows, batches shuffled under `seed` (default --seed), the best state on
    dev_rows kept. The global RNG (dropout, fresh heads) is the caller's to seed."""
    seed = args.seed if seed is None else seed
    train_loader = rows_loader(data, train_rows, tokenizer, args.max_seq_length, args.batch_size, True, seed)
    dev_loader = rows_loader(data, dev_rows, tokenizer, args.max_seq_length, args.eval_batch_size, False, args.seed)
    return finetune(model, train_loader, dev_loader, run, epochs, lr, args.weight_decay, args.warmup, tag=tag,
                    params=params)


def aua_on(predict: Callable, data: TaskData, args, run: Run, prefix: str, resources, n: int) -> dict:
    """{aua_<recipe>: Aua} of every --attacks recipe on a seeded sample of n test examples (e.g. a point of a curve);
    a recipe that raised is left out."""
    sample_args = copy.copy(args)
    sample_args.attack_examples = n
    robust = evaluate_robustness(predict, data, sample_args, run, prefix, resources)
    return {f"aua_{a}": v["aua"] for a, v in robust.items() if "error" not in v}


def mark_known(row: dict, known: list):
    """Tag each attack of a results row as known (one the method trained on) or not; the mean Aua of each group."""
    for name, metrics in row["attacks"].items():
        metrics["known"] = name in known
    for group, flag in (("known", True), ("unknown", False)):
        auas = [m["aua"] for m in row["attacks"].values() if m["known"] == flag and "error" not in m]
        row[f"aua_{group}_mean"] = float(np.mean(auas)) if auas else None


def evaluate_row(row: dict, predict: Callable, args, run: Run, data: TaskData, resources, dev_rows: list,
                 test_rows: list, known: list, transfer: Optional[dict], attacked: dict, weights=None) -> dict:
    """Fill the results row of a whole predictor: clean dev and test accuracy, every --attacks recipe (known or not),
    accuracy on the transfer sets. A `weights` fingerprint already in `attacked` ({weights: (row key, attacks)})
    is a bit-identical predictor: the seeded attacks' results are copied, not run again. transfer None: this row's
    successful attacks become the transfer sets. Returns the transfer sets."""
    row.update(dev_accuracy=rows_accuracy(predict, dev_rows), clean_accuracy=rows_accuracy(predict, test_rows))
    print(f"[eval {row['key']}] clean test accuracy {row['clean_accuracy']:.2f}%", flush=True)
    if weights in attacked:
        print(f"[eval {row['key']}] same weights as the {attacked[weights][0]} row: its attack results reused",
              flush=True)
        row["attacks"] = copy.deepcopy(attacked[weights][1])
    else:
        row["attacks"] = evaluate_robustness(predict, data, args, run, f"{row['key']}_", resources, row=row)
        if weights is not None:
            attacked[weights] = (row["key"], row["attacks"])
    mark_known(row, known)
    if transfer is None:  # the first row's own successful test attacks (single-text tasks only)
        transfer = successful_rows(run.dir, row["attacks"], data)
    row["transfer"] = {a: rows_accuracy(predict, s) for a, s in transfer.items() if s}
    return transfer


def full_at_row(args, data: TaskData, run: Run, resources, train_rows: list, dev_rows: list, clean_dev_rows: list,
                known: list, transfer: dict, cost: dict) -> tuple:
    """The full adversarial-training baseline: a fresh --model fully fine-tuned (--full-lr, --full-epochs) on clean +
    adversarial train_rows, selected on dev_rows, evaluated as evaluate_row does; its wall_clock: `cost` (the seconds
    of what made its data), full_at and evaluation. Returns (row, training seconds)."""
    set_seed(args.seed)  # its head and dropout draw from the RNG: the same model whether earlier stages were cached
    model, tokenizer = load_model(args.model, data.num_labels, args.max_seq_length,
                                  os.path.join(args.output_dir, ".tiny-bert"))
    stats = finetune_rows(model, tokenizer, data, train_rows, dev_rows, run, args, args.full_epochs, args.full_lr,
                          "full_at")
    start, n = time.time(), count_params(model)["total"]
    row = {"key": "full-at", "setting": "full AT (clean+adv)", "passes_per_example": 1,
           "params": {"trainable": n, "trainable_pct_of_backbone": 100.0, "total": n}}
    evaluate_model(model, tokenizer, data, args, run, row, "full-at_", resources=resources)
    mark_known(row, known)
    predict = Predictor(model, tokenizer, args.max_seq_length, args.eval_batch_size, run.device, run.autocast)
    row["dev_accuracy"] = rows_accuracy(predict, clean_dev_rows)
    row["transfer"] = {a: rows_accuracy(predict, s) for a, s in transfer.items() if s}
    row["wall_clock"] = {**cost, "full_at": stats["seconds"], "evaluation": time.time() - start}
    return row, stats["seconds"]


def robustness_gain(robust: dict, seed: int = 0) -> dict:
    """Two predictors' robust flags on the same examples ({name: flags}, the reference first): n, the Aua of each
    (aua_<name>), the paired delta (second - first) with its 95 % bootstrap interval, passed = the interval > 0."""
    (reference, before), (other, after) = robust.items()
    delta, low, high = paired_interval(after, before, seed=seed)
    return {"n": len(before), f"aua_{reference}": 100.0 * np.mean(before), f"aua_{other}": 100.0 * np.mean(after),
            "delta": delta, "ci": [low, high], "passed": low > 0}


def adaptive_objective(clean: float, robust: dict) -> dict:
    """A selection objective against adaptive attacks: (clean accuracy + the mean Aua over the recipes of `robust`,
    {recipe: robust flags} each run on the candidate predictor itself) / 2, with each Aua as dev_aua_<recipe>."""
    auas = {f"dev_aua_{name}": 100.0 * float(np.mean(flags)) for name, flags in robust.items()}
    return {**auas, "adaptive_objective": (clean + float(np.mean(list(auas.values())))) / 2}


class MixingPredictor(Predictor):
    """A predictor that mixes components per input: a subclass's mix(enc) gives (logits, weights) of one tokenised
    batch; run(texts) both for every text as numpy arrays (mixing_profile reads the weights); attacks see the logits."""

    @torch.no_grad()
    def run(self, texts):
        self.model.eval()
        out = [self.mix(dict(enc)) for enc in self.batches(texts)]
        return tuple(torch.cat([o[i].cpu() for o in out]).numpy() for i in (0, 1))

    def __call__(self, texts):
        return self.run(texts)[0]


def mixing_profile(predict, names: list, clean_texts: list, adversarial: dict, source: str) -> dict:
    """For a MixingPredictor (weights column 0: the clean component, names[k]: component k): which component each
    adversarial input most resembles (the largest weight among k >= 1, or "clean" when column 0 is larger) per attack,
    and the detection AUROC of 1 - weight_0 between clean_texts and the adversarial {attack: (input, label) rows}
    from `source`."""
    _, clean_beta = predict.run(clean_texts)
    out = {"source": source, "mean_beta_clean_on_clean": float(clean_beta[:, 0].mean()), "by_attack": {}}
    scores = []
    for name, rows in ((name, rows) for name, rows in adversarial.items() if rows):
        _, beta = predict.run([t for t, _ in rows])
        attributed = [names[1 + k] if beta[i, 0] < beta[i, 1 + k] else "clean"
                      for i, k in enumerate(beta[:, 1:].argmax(1))]
        out["by_attack"][name] = {"n": len(rows), "mean_beta_clean": float(beta[:, 0].mean()),
                                  "attributed": {s: attributed.count(s) for s in names}}
        scores.append(1 - beta[:, 0])
    if scores:
        out["detection_auroc"] = auroc(1 - clean_beta[:, 0], np.concatenate(scores))
        print(f"[profile] detection AUROC (1 - beta_clean, clean vs adversarial {source}): "
              f"{out['detection_auroc']:.3f}", flush=True)
    return out


def finish_rows(run: Run, results: dict, rows: list, main_row: dict, non_embedding: int, warnings: list) -> dict:
    """The final results.json of a run with several predictor rows (in results["extra"]["rows"]): `main_row` on top
    (its setting, params with `non_embedding`, dev and test accuracy, attacks); the summary table, the warnings."""
    results.update(setting=main_row["setting"], params={"total": main_row["params"]["total"],
                   "non_embedding": non_embedding}, dev_accuracy=main_row["dev_accuracy"],
                   clean_accuracy=main_row["clean_accuracy"], attacks=main_row["attacks"])
    finish_run(run, results)
    print_summary([(r["setting"][:27], r) for r in rows])
    for w in warnings:
        print(f"warning: {w}")
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
            cell = "FAILED" if m and "error" in m else f"{m['aua']:.1f}/{m['suc']:.1f}" if m else "-"
            line += f"{cell:>20}"
        print(line)


# ---- `python attacks.py --checkpoint DIR`: attack a saved model; resume a killed attack; one shard of a cluster array
def checkpoint_name(path: str) -> str:
    """'finetune checkpoint (seed 1)' for RUNS/{task}__finetune__1__{time}/model; else the folder's last two parts."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    run = next((p for p in reversed(parts[:-1]) if p.count("__") >= 3), None)
    if run:
        _, exp, seed = run.split("__")[:3]
        return f"{exp} {parts[-1]} (seed {seed})"
    return "/".join(parts[-2:])


def main(argv=None):
    import argparse
    import sys

    from common import add_common_args, load_task, results_template, start_run, usage_errors, validate_common_args

    parser = argparse.ArgumentParser(description="Attack a saved checkpoint (save_pretrained folder: fine-tune, "
                                     "FreeLB or robust-ticket models) under the shared protocol, without training.")
    add_common_args(parser, "attack")
    parser.add_argument("--checkpoint", required=True, help="the model folder to attack")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the attacks of this earlier run "
                        "folder of attacks.py: examples already in its CSVs are not attacked again")
    args = parser.parse_args(argv)
    with usage_errors():
        validate_common_args(args)
        run = start_run(args, "attack", resume=args.resume, free=("resume", "output_dir"))
        data = load_task(args)
        model, tokenizer = load_model(args.checkpoint, data.num_labels, args.max_seq_length)
        model.to(run.device)
        results = results_template(args, "attack", checkpoint_name(args.checkpoint), model)
        results["checkpoint"] = os.path.abspath(args.checkpoint)
        evaluate_model(model, tokenizer, data, args, run, results)
        finish_run(run, results)
        print_summary([(results["setting"], results)])
    sys.stdout.flush()


if __name__ == "__main__":
    main()
