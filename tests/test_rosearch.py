# Tests of rosearch.py (docs/rosearch.md): search space, ops and padding, evolution, resume, CLI.
import json
import os
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import rosearch as rs
from attacks import read_records, stratified_indices
from common import UsageError, count_params
from conftest import needs_nltk  # noqa: E402
from finetune import kd_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_OPS = ["conv3", "max_pool3", "identity"]


def make_space(ops=None, max_cells=3, hidden=(8, 16), min_compression=1.0):
    return rs.Space(list(ops or rs.OPS), 1, max_cells, list(hidden), {"embed_dim": 16, "num_labels": 2},
                    {"total": 60_000, "non_embedding": 59_000}, embedding_params=1000, embedding_tables=968,
                    min_compression=min_compression)


def evo_args(**kw):
    base = dict(seed=3, population=8, tournament=3, cycles=20, crossover_prob=0.3)
    return SimpleNamespace(**{**base, **kw})


def read_history(path):
    return read_records(path, rs.check_record, "candidate", "RoSearch history.jsonl")


def planted_fitness(target):
    """A deterministic stand-in for KD + probe attack: closeness to a planted genotype."""
    def evaluate(genotype, index):
        dist = abs(len(genotype["cells"]) - len(target["cells"])) + (genotype["hidden"] != target["hidden"])
        for c, cell in enumerate(genotype["cells"][: len(target["cells"])]):
            dist += sum(e != t for n, tn in zip(cell, target["cells"][c]) for e, t in zip(n, tn))
        score = 100.0 - 5.0 * dist
        return {"R": score, "A": score, "E": 0.5, "E_max": 1.0, "params": {"total": 1, "non_embedding": 1},
                "compression": {"total": 2.0, "non_embedding": 2.0}}
    return evaluate


def test_genotype_json_roundtrip_and_stable_hash():
    genotype = {"hidden": 128, "cells": [[[[1, "conv3"], [0, "identity"]], [[2, "zero"], [1, "max_pool3"]],
                                          [[3, "conv7"], [2, "dil_conv5"]]]]}
    back = json.loads(json.dumps(genotype))
    assert back == genotype and rs.genotype_hash(back) == rs.genotype_hash(genotype)
    assert rs.genotype_hash({"cells": genotype["cells"], "hidden": 128}) == rs.genotype_hash(genotype)
    assert rs.genotype_hash(genotype) == "381a53de9747"  # pinned: a hash may never change across versions
    other = json.loads(json.dumps(genotype))
    other["cells"][0][0][0][1] = "conv5"
    assert rs.genotype_hash(other) != rs.genotype_hash(genotype)


def test_random_genotypes_valid_and_within_budget():
    space = make_space(max_cells=4, hidden=(8, 16, 32), min_compression=6.0)
    history = rs.evolve(space, evo_args(population=30, cycles=0), [0.5, 0.5, 0.0], planted_fitness(
        space.random_genotype(random.Random(0))))
    assert len({r["hash"] for r in history}) == 30
    for r in history:
        assert space.is_valid(r["genotype"]) and space.within_budget(r["genotype"])
    rng = random.Random(1)
    assert all(space.is_valid(space.random_genotype(rng)) for _ in range(200))


def test_meta_param_count_matches_the_built_student():
    from offline import tiny_bert

    teacher, _ = tiny_bert(2, "/tmp/rosearch_test_tiny")
    emb = teacher.base_model.embeddings
    space = rs.Space(list(rs.OPS), 1, 3, [16], {"embed_dim": 64, "num_labels": 2}, count_params(teacher),
                     sum(p.numel() for p in emb.parameters()),
                     sum(m.weight.numel() for m in emb.modules() if isinstance(m, torch.nn.Embedding)))
    ctx = SimpleNamespace(space=space, teacher=teacher, args=SimpleNamespace(freeze_embeddings=True),
                          run=SimpleNamespace(device=torch.device("cpu")))
    for seed in range(5):
        genotype = space.random_genotype(random.Random(seed))
        assert space.params(genotype) == count_params(rs.build_student(genotype, ctx))


@pytest.mark.parametrize("name", list(rs.OPS))
def test_every_op_keeps_shape_and_ignores_padding(name):
    torch.manual_seed(0)
    op = rs.Op(name, 8, heads=2).eval()
    x = torch.randn(2, 9, 8)
    mask = torch.ones(2, 9, 1)
    mask[1, 5:] = 0
    garbage = x.clone()
    garbage[1, 5:] = 1e3 * torch.randn(4, 8)
    y, y_garbage = op(x, mask), op(garbage, mask)
    assert y.shape == x.shape
    assert torch.allclose(y, y_garbage, atol=1e-5)
    assert torch.all(y[1, 5:] == 0) and torch.isfinite(y).all()


def test_student_logits_ignore_padded_tokens_and_checkpoint_loads_back(tmp_path):
    from offline import tiny_bert

    teacher, _ = tiny_bert(2, str(tmp_path / "tiny"))
    space = rs.Space(list(rs.OPS), 1, 3, [8], {"embed_dim": 64, "num_labels": 2, "heads": 2}, count_params(teacher))
    ctx = SimpleNamespace(space=space, teacher=teacher, args=SimpleNamespace(freeze_embeddings=True),
                          run=SimpleNamespace(device=torch.device("cpu")))
    genotype = {"hidden": 8, "cells": [space.random_cell(random.Random(s)) for s in range(3)]}
    student = rs.build_student(genotype, ctx).eval()
    ids = torch.tensor([[2, 40, 41, 42, 3, 0, 0], [2, 40, 41, 42, 3, 77, 88]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]] * 2)
    logits = student(input_ids=ids, attention_mask=mask)
    assert torch.allclose(logits[0], logits[1], atol=1e-5)
    assert not any(p.requires_grad for p in student.embeddings.parameters())
    student.save(str(tmp_path / "student.pt"), space.student, {"A": 50.0})
    back, record = rs.Student.load(str(tmp_path / "student.pt"), teacher)
    assert torch.allclose(back.eval()(input_ids=ids, attention_mask=mask), logits) and record == {"A": 50.0}


def test_mutation_and_crossover_produce_valid_genotypes():
    space = make_space(max_cells=4, hidden=(8, 16, 32))
    rng = random.Random(0)
    kinds_seen = set()
    for _ in range(300):
        a, b = space.random_genotype(rng), space.random_genotype(rng)
        child = rs.mutate(a, space, rng)
        assert space.is_valid(child) and child != a
        kinds_seen.add((len(child["cells"]) != len(a["cells"]), child["hidden"] != a["hidden"]))
        assert space.is_valid(rs.mutate(rs.crossover(a, b, rng), space, rng))
    assert kinds_seen == {(False, False), (True, False), (False, True)}  # op/input, depth and width all happen
    assert space.is_valid(a) and not space.is_valid({"hidden": 8, "cells": [[[[2, "conv3"]] * 2] * 3]})


def test_evolution_finds_a_planted_optimum():
    space = make_space(ops=SMALL_OPS, max_cells=2, hidden=(8,))
    target = {"hidden": 8, "cells": [[[[1, "conv3"], [0, "identity"]], [[2, "max_pool3"], [1, "conv3"]],
                                      [[3, "identity"], [2, "conv3"]]]]}
    history = rs.evolve(space, evo_args(population=10, tournament=4, cycles=250, crossover_prob=0.0),
                        [0.5, 0.5, 0.0], planted_fitness(target))
    best = max(history, key=lambda r: r["fitness"])
    assert best["genotype"] == target
    assert max(r["fitness"] for r in history[:10]) < best["fitness"]  # found by evolution, not the initial draw


def test_resume_after_interruption_reproduces_the_history(tmp_path, capsys):
    space = make_space(ops=SMALL_OPS, max_cells=3)
    target = space.random_genotype(random.Random(9))
    args, weights = evo_args(), [0.5, 0.5, 0.1]
    full = rs.evolve(space, args, weights, planted_fitness(target))
    path = tmp_path / "history_rosearch.jsonl"
    stand_in = planted_fitness(target)

    def interrupted(genotype, index):
        if index == 13:
            raise KeyboardInterrupt
        return stand_in(genotype, index)

    def append(record):
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    with pytest.raises(KeyboardInterrupt):
        rs.evolve(space, args, weights, interrupted, on_record=append)
    lines = path.read_text().splitlines()
    lines[4] = lines[4][:40]  # a torn write in the middle of the file
    path.write_text("\n".join(lines) + "\n")
    stored = read_history(str(path))
    assert "line 5 is corrupt" in capsys.readouterr().err and len(stored) == 12
    calls = []
    resumed = rs.evolve(space, args, weights, lambda g, i: calls.append(i) or stand_in(g, i), stored)
    assert calls == [4] + list(range(13, args.population + args.cycles))  # only the lost and the new ones
    assert [(r["hash"], r["fitness"]) for r in resumed] == [(r["hash"], r["fitness"]) for r in full]


def test_random_search_draws_the_budget_at_random_whatever_the_fitness():
    """The equal-budget control: P + C candidates, each a fresh random genotype (never a mutation or crossover), the
    same sequence whatever the scores; its first P are RoSearch's initial population (shared evaluations)."""
    space = make_space(ops=SMALL_OPS, max_cells=3, min_compression=2.0)
    args, weights = evo_args(population=5, tournament=3, cycles=15), [0.5, 0.5, 0.0]
    targets = [space.random_genotype(random.Random(s)) for s in (1, 2)]
    real = rs.mutate, rs.crossover

    def forbidden(*unused):
        raise AssertionError("the random search mutated or crossed a genotype")

    rs.mutate = rs.crossover = forbidden
    try:
        calls = []
        first = rs.evolve(space, args, weights, lambda g, i: calls.append(i) or planted_fitness(targets[0])(g, i),
                          random_search=True)
        second = rs.evolve(space, args, weights, planted_fitness(targets[1]), random_search=True)
    finally:
        rs.mutate, rs.crossover = real
    assert calls == list(range(20)) and len(first) == 20  # exactly the budget P + C, each trained once
    assert [r["hash"] for r in first] == [r["hash"] for r in second]  # the scores never steer the proposals
    assert len({r["hash"] for r in first}) == 20 and all(r["proposal"] == "random" for r in first)
    assert all(space.is_valid(r["genotype"]) and space.within_budget(r["genotype"]) for r in first)
    evolution = rs.evolve(space, args, weights, planted_fitness(targets[0]))
    assert [r["hash"] for r in first[:5]] == [r["hash"] for r in evolution[:5]]
    assert all(r["proposal"] != "random" for r in evolution[5:])  # the evolution's own children are mutations


def test_bad_search_spaces_are_one_line_errors(tmp_path):
    with pytest.raises(UsageError, match="no genotype meets --min-compression"):
        make_space(hidden=(64,), min_compression=1000.0).check()
    with pytest.raises(UsageError, match="search space exhausted"):
        rs.evolve(make_space(ops=["identity"], max_cells=1, hidden=(8,)),  # 576 genotypes < P
                  evo_args(population=600, tournament=2, cycles=0), [1, 1, 0],
                  planted_fitness({"hidden": 8, "cells": []}))
    (tmp_path / "history_rosearch.jsonl").write_text("not json\n{\"index\": 1}\n")
    with pytest.raises(UsageError, match="no valid line"):
        read_history(str(tmp_path / "history_rosearch.jsonl"))
    for flags, message in [(["--ops", "conv9"], "unknown op 'conv9'"), (["--fitness-weights", "0,0,1"], r"w_r \+ w_a"),
                           (["--min-cells", "3", "--max-cells", "2"], "--max-cells")]:
        with pytest.raises(UsageError, match=message):
            rs.validate(rs.parse_args(["--task", "toy", "--model", "tiny", *flags]))
    with pytest.raises(SystemExit):  # argparse's choices: one line, exit 2
        rs.parse_args(["--task", "toy", "--model", "tiny", "--fitness-attack", "fgsm"])
    out = subprocess.run([sys.executable, "rosearch.py", "--task", "toy", "--model", "tiny", "--ops", ""], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("error: --ops is empty"), out.stderr


def test_kd_loss_limits():
    logits, teacher = torch.randn(4, 2), torch.randn(4, 2)
    batch = {"labels": torch.tensor([0, 1, 1, 0]), "teacher_logits": teacher}
    ce = torch.nn.functional.cross_entropy(logits, batch["labels"])
    assert torch.allclose(kd_loss(0.0, 2.0)(logits, batch), ce)
    assert kd_loss(1.0, 2.0)(teacher, batch).abs() < 1e-6
    assert kd_loss(1.0, 2.0)(logits, batch) > 0


def run_cli(tmp_path, capsys, *flags):
    """The script's main() in-process (saves the interpreter start); returns what it printed."""
    argv = ["--task", "toy", "--model", "tiny", "--no-cuda", "--output-dir", str(tmp_path / "runs"), "--cache-dir",
            str(tmp_path / "cache"), "--max-train-examples", "64", "--max-eval-examples", "40", "--max-seq-length",
            "32",
            "--epochs", "1", "--lr", "1e-3", "--attacks", "none", "--hidden", "8", "--max-cells", "2",
            "--proxy-epochs", "1", "--final-epochs", "1", "--top-k", "1", "--probe-examples", "4", "--speed-examples",
            "16", "--student-batch-size", "32", "--population", "3", "--tournament", "2", "--cycles", "1", *flags]
    capsys.readouterr()
    rs.main(rs.parse_args(argv))
    return capsys.readouterr().out


@needs_nltk  # the DeepWordBug probe imports textattack, which needs the NLTK stopwords
def test_cli_search_rows_attack_probe_resume_and_bench(tmp_path, capsys):
    import shutil

    import bench

    # one real run: tiny teacher, DeepWordBug probe on 4 dev sentences, 3 + 1 candidates, hand-made, teacher and
    # random-search rows (the random search shares the 3 initial candidates, then draws 1 of its own)
    flags = ["--fitness-attack", "deepwordbug", "--extra-rows", "handmade,teacher,random-search", "--handmade-cells",
             "1"]
    out = run_cli(tmp_path, capsys, *flags)
    (run_dir,) = [os.path.join(tmp_path / "runs", d) for d in os.listdir(tmp_path / "runs")]
    results = json.load(open(os.path.join(run_dir, "results.json")))
    assert results["setting"] == "RoSearch student" and results["compression"] > 1
    assert [r["setting"] for r in results["extra"]["rows"]] == ["hand-made student", "teacher", "random search"]
    assert results["extra"]["compression"]["non_embedding"] >= 4.6 and results["extra"]["trained_candidates"] == 5
    history = [json.loads(line) for line in open(os.path.join(run_dir, "history_rosearch.jsonl"))]
    assert len(history) == 4 and all(0 <= r["R"] <= 100 for r in history)
    assert {"R", "R_credit", "A", "A_floor", "majority_share", "E", "params", "fitness", "genotype"} <= set(history[0])
    randoms = [json.loads(line) for line in open(os.path.join(run_dir, "history_random-search.jsonl"))]
    assert len(randoms) == 4 and [r["proposal"] for r in randoms] == ["random"] * 4  # RoSearch's budget, all random
    assert [r["hash"] for r in randoms[:3]] == [r["hash"] for r in history[:3]] and randoms[3] != history[3]
    assert results["extra"]["rows"][2]["extra"]["candidates"] == 4
    assert "bench" not in out
    # killed after two candidates (a corrupt last line, no finalists, no rows): resumed in place, nothing twice
    cut = tmp_path / "runs" / "cut"
    shutil.copytree(run_dir, cut)
    for name in ("rows", "students", "results.json"):
        shutil.rmtree(cut / name, ignore_errors=True) if name != "results.json" else os.remove(cut / name)
    lines = open(os.path.join(run_dir, "history_rosearch.jsonl")).read().splitlines()
    (cut / "history_rosearch.jsonl").write_text("\n".join(lines[:2] + ["{garbage"]) + "\n")
    out = run_cli(tmp_path, capsys, *flags, "--resume", str(cut))
    assert "fine-tuning" not in out and "resuming: 2 stored" in out
    resumed = [json.loads(line) for line in open(cut / "history_rosearch.jsonl")]
    assert [(r["hash"], round(r["fitness"], 6)) for r in resumed] == [(r["hash"], round(r["fitness"], 6))
                                                                      for r in history]
    again = json.load(open(cut / "results.json"))
    assert again["extra"]["trained_candidates"] == 2 and again["clean_accuracy"] == results["clean_accuracy"]
    # a finished run resumed: no candidate, finalist or row trained or evaluated again
    out = run_cli(tmp_path, capsys, *flags, "--resume", str(cut))
    assert json.load(open(cut / "results.json"))["extra"]["trained_candidates"] == 0
    assert out.count("evaluated before the resume") == 4
    # killed while training the random search's own candidate (after RoSearch finished): only that one is trained
    cut = tmp_path / "runs" / "cut_random"
    shutil.copytree(run_dir, cut, ignore=shutil.ignore_patterns("rows", "results.json"))
    (cut / "history_random-search.jsonl").write_text("".join(json.dumps(r) + "\n" for r in randoms[:3]))
    out = run_cli(tmp_path, capsys, *flags, "--resume", str(cut))
    assert "[random-search] resuming: 3 stored" in out and json.load(open(cut / "results.json"))["extra"][
        "trained_candidates"] == 1
    assert [json.loads(line)["hash"] for line in open(cut / "history_random-search.jsonl")] == [r["hash"]
                                                                                              for r in randoms]
    with pytest.raises(UsageError, match="was run with other flags: --proxy-epochs 1.0 \\(now 2.0\\)"):
        run_cli(tmp_path, capsys, *flags, "--resume", str(cut), "--proxy-epochs", "2")
    argv = ["--task", "toy", "--model", "tiny", "--no-cuda", "--output-dir", str(tmp_path / "runs"), "--cache-dir",
            str(tmp_path / "cache"), "--attacks", "none", "--hidden", "8", "--max-cells", "2", "--bench",
            "--bench-candidates", "1", "--fitness-attack", "pgd", "--max-seq-length", "32", "--speed-examples", "16"]
    capsys.readouterr()
    bench.bench_rosearch(rs.parse_args(argv))
    out = capsys.readouterr().out
    assert "s per evaluated candidate" in out and "vs teacher" in out


def test_kd_loss_is_kl_teacher_to_student_times_t_squared():
    logits, teacher = torch.tensor([[2.0, -1.0], [0.5, 0.3]]), torch.tensor([[0.1, 1.5], [-2.0, 1.0]])
    batch = {"labels": torch.tensor([0, 1]), "teacher_logits": teacher}
    t = 2.0
    p, q = (teacher / t).softmax(-1), (logits / t).softmax(-1)  # KL(p_teacher || q_student), not the reverse
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    reverse = (q * (q.log() - p.log())).sum(-1).mean()
    assert not torch.isclose(kl, reverse)
    assert torch.isclose(kd_loss(1.0, t)(logits, batch), t ** 2 * kl)
    ce = torch.nn.functional.cross_entropy(logits, batch["labels"])
    assert torch.isclose(kd_loss(0.8, t)(logits, batch), 0.2 * ce + 0.8 * t ** 2 * kl)


def test_aging_removes_the_oldest_not_the_worst():
    """Candidate 0 is the best; with P = 3 it must leave the population at candidate 3 (aging), so tournaments
    after that never pick it as a parent; 'remove the worst' would keep it forever."""
    space = make_space(ops=SMALL_OPS, max_cells=3)
    scores = iter([100.0] + [10.0] * 40)
    parents = []

    def evaluate(genotype, index):
        score = next(scores)
        return {"R": score, "A": score, "E": 0.5, "E_max": 1.0, "params": {"total": 1, "non_embedding": 1},
                "compression": {"total": 2.0, "non_embedding": 2.0}}

    real_mutate = rs.mutate

    def spy(genotype, space_, rng):
        parents.append(rs.genotype_hash(genotype))
        return real_mutate(genotype, space_, rng)

    rs.mutate = spy
    try:
        history = rs.evolve(space, evo_args(population=3, tournament=3, cycles=8, crossover_prob=0.0), [0.5, 0.5, 0],
                            evaluate)
    finally:
        rs.mutate = real_mutate
    best = history[0]["hash"]
    assert parents[0] == best  # candidate 3: the whole population is the tournament, the best is still in it
    assert best not in parents[1:]  # after candidate 3, the oldest (the best) has aged out


def test_mutated_children_stay_within_the_budget():
    space = make_space(max_cells=4, hidden=(8, 16, 32), min_compression=8.0)
    history = rs.evolve(space, evo_args(population=6, tournament=3, cycles=40), [0.5, 0.5, 0.0], planted_fitness(
        {"hidden": 32, "cells": [space.random_cell(random.Random(1)) for _ in range(4)]}))  # pulls to big ones
    assert len(history) == 46 and all(space.within_budget(r["genotype"]) for r in history)
    assert any(r["proposal"] == "mutation" for r in history[6:])


def test_collapse_guard_gives_a_one_class_student_no_robustness_credit():
    weights = [0.5, 0.5, 0.05]
    constant = rs.credit({"R": 50.0, "A": 50.0, "E": 0.2, "E_max": 0.2}, floor_accuracy=0.9 * 86.0)
    real = rs.credit({"R": 14.0, "A": 84.0, "E": 0.2, "E_max": 0.2}, floor_accuracy=0.9 * 86.0)
    assert constant["R_credit"] == 0.0 and real["R_credit"] == 14.0
    assert rs.fitness(real, weights) > rs.fitness(constant, weights)
    assert rs.fitness({"R": 50.0, "A": 50.0, "E": 0.2, "E_max": 0.2}, weights) > rs.fitness(real, weights)  # unguarded
    probe = stratified_indices([0] * 90 + [1] * 10, 20, seed=0)
    assert len(probe) == 20 and sum(i >= 90 for i in probe) == 10  # every class up to its size, then the rest
    assert list(stratified_indices([0, 1] * 50, 10, seed=0)) == list(stratified_indices([0, 1] * 50, 10, seed=0))


def test_teacher_cache_key_covers_every_fine_tuning_flag(tmp_path):
    import common
    import finetune

    def folder(*flags):
        args = rs.validate(rs.parse_args(["--task", "toy", "--model", "tiny", "--output-dir", str(tmp_path),
                                          "--max-train-examples", "40", "--max-eval-examples", "20", *flags]))
        return finetune.teacher_cache(args, common.load_task(args), str(tmp_path))

    base = folder()
    assert folder() == base
    for flags in (["--warmup", "0.2"], ["--weight-decay", "0.1"], ["--lr", "1e-3"], ["--epochs", "2"], ["--seed", "2"],
                  ["--max-train-examples", "30"], ["--max-seq-length", "64"]):
        assert folder(*flags) != base, flags


def test_flops_count_convs_by_kernel_and_width():
    space = make_space(ops=["conv3", "conv7", "identity"], hidden=(8, 16))
    cell = [[[0, "conv3"], [1, "identity"]], [[2, "conv7"], [0, "identity"]], [[3, "identity"], [1, "identity"]]]
    small, big = {"hidden": 8, "cells": [cell]}, {"hidden": 16, "cells": [cell, cell]}
    per_cell = 2 * 8 * 8 * 3 + 2 * 8 * 8 * 7 + 2 * 3 * 8  # two convs + the weighted-sum merge
    assert space.flops(small, 32) == 2 * 16 * 8 + per_cell
    assert space.flops(big, 32) == 2 * 16 * 16 + 2 * (2 * 16 * 16 * 3 + 2 * 16 * 16 * 7 + 2 * 3 * 16)


def test_folded_embeddings_count_exactly_and_folding_keeps_the_logits():
    from offline import tiny_bert

    teacher, tokenizer = tiny_bert(2, "/tmp/rosearch_test_tiny")
    emb = teacher.base_model.embeddings
    rows = sum(getattr(emb, t).num_embeddings for t in ("word_embeddings", "position_embeddings",
                                                        "token_type_embeddings"))
    space = rs.Space(list(rs.OPS), 1, 3, [16], {"embed_dim": 64, "num_labels": 2, "folded": True},
                     count_params(teacher), embedding_tables=rows * 64)
    ctx = SimpleNamespace(space=space, teacher=teacher, args=SimpleNamespace(freeze_embeddings=True),
                          run=SimpleNamespace(device=torch.device("cpu")))
    enc = dict(tokenizer(["the movie was good", "a dull and boring plot"], padding=True, return_tensors="pt"))
    for seed in range(3):
        genotype = space.random_genotype(random.Random(seed))
        torch.manual_seed(seed)
        student = rs.build_student(genotype, ctx).eval()
        with torch.no_grad():
            student.project.bias.normal_()  # a trained projection has a bias: it must fold into the type table
            before = student(**enc)
        folded = student.fold()
        with torch.no_grad():
            after = folded(**enc)
        assert torch.allclose(before, after, atol=1e-5)
        counted, built = space.params(genotype), count_params(folded)
        assert counted["total"] == built["total"] == sum(p.numel() for p in folded.parameters())
        assert counted["non_embedding"] == built["non_embedding"]
        assert folded.get_input_embeddings().embedding_dim == 16 and isinstance(folded.project, torch.nn.Identity)
    # a MiniLM-sized teacher (22.7M): the folded H=128 tables alone are 3.97M, so 4.6x total (4.94M) leaves < 1M for cells
    assert 30522 * 128 + 512 * 128 + 2 * 128 == 3_972_608
