# report.py builds the comparison from results.json files alone: rows from extra.rows, mean ± std over seeds, failures.
import json
import os

import pytest

import report


def write_run(folder, seed, aua, extra_rows=None):
    os.makedirs(folder)
    result = {"method": "robust_ticket", "setting": "ticket s=0.7", "task": "toy", "model": "tiny", "seed": seed,
              "params": {"total": 1000, "non_embedding": 400}, "sparsity": 0.7, "compression": None,
              "wall_clock": {"search": 10.0, "retrain": 5.0, "evaluate": 99.0, "total": 120.0},
              "clean_accuracy": 90.0, "attacks": {"pwws": {"aua": aua, "suc": 100 - aua, "queries": 10.0}},
              "extra": {"rows": extra_rows or []}}
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(result, f)


def test_summary_groups_seeds_expands_rows_and_marks_failures(tmp_path):
    fine_tune = {"setting": "Fine-tune", "params": {"total": 1000, "non_embedding": 400}, "wall_clock": {"train": 3.0},
                 "clean_accuracy": 92.0, "attacks": {"pwws": {"aua": 5.0, "suc": 94.0, "queries": 9.0}}}
    write_run(tmp_path / "runs" / "a", 1, 20.0, [fine_tune])
    write_run(tmp_path / "runs" / "b", 2, 30.0)
    os.makedirs(tmp_path / "failed")
    (tmp_path / "failed" / "rosearch__1.txt").write_text("error: --ops is empty")
    rows = report.load_rows(str(tmp_path))
    assert sorted(r["setting"] for r in rows) == ["Fine-tune", "ticket s=0.7", "ticket s=0.7"]
    table = report.summary_table(rows, report.read_failures(str(tmp_path)))
    ticket_line = next(line for line in table.splitlines() if "ticket s=0.7" in line)
    assert "25.0 ± 7.1" in ticket_line  # mean and sample std of 20 and 30
    assert "| 15.0 ± 0.0 |" in ticket_line  # training seconds: search + retrain, not evaluation or total
    assert "sparsity 70%" in ticket_line
    assert "rosearch | FAILED (seed 1) | error: --ops is empty" in table


def test_bench_table_reads_each_log_and_says_what_was_not_measured(tmp_path):
    (tmp_path / "robust_ticket.log").write_text(
        "[bench] dense FreeLB step 4115.6 ms CPU   mask-search step 5001.4 ms CPU   ratio 1.22x (target <= 1.5x)\n"
        "[bench] inference: dense 219.1 ms CPU   folded ticket (s=0.3) 218.5 ms CPU   ratio 1.00x\n")
    (tmp_path / "early_bird_adv.log").write_text("[bench] projected_speedup            2.548\n")
    lines = report.bench_table(str(tmp_path)).splitlines()
    assert lines[0] == "| benchmark | measured | target |"
    row = {line.split(" | ")[0][2:]: line.split(" | ")[1] for line in lines[2:]}
    assert row["robust ticket: mask-search step / dense FreeLB step (same K)"] == "1.22x"
    assert row["robust ticket: folded ticket / dense inference"] == "1.00x"
    assert next(v for k, v in row.items() if k.startswith("early-bird: time-to-ticket")) == "2.548x"
    assert row["RoSearch: seconds per evaluated candidate"] == "not measured (see rosearch.log)"


def attack_entry(outcomes, resources="real", n=None):
    n = len(outcomes) if n is None else n
    return {"recipe": "PWWSRen2019", "attack_seed": 0, "n": n, "resources": resources, "query_budget": None,
            "max_modify_rate": None, "sample": "abc", "outcomes": outcomes, "predictions": [n // 2, n - n // 2],
            "aua": 100 * outcomes.count("F") / n, "suc": 50.0, "queries": 10.0}


def write_row(folder, method, setting, seed, outcomes, task="sst2", resources="real", predictions=None, clean=85.0):
    os.makedirs(folder)
    result = {"method": method, "setting": setting, "task": task, "model": "m", "seed": seed, "max_seq_length": 64,
              "data": {"task": task, "train": 100, "test": 200, "test_fingerprint": f"fp-{task}"},
              "params": {"total": 10, "non_embedding": 5}, "wall_clock": {}, "clean_accuracy": clean,
              "test_predictions": predictions or [100, 100], "test_labels": [100, 100],
              "attacks": {"pwws": attack_entry(outcomes, resources)}, "extra": {}}
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(result, f)


def test_runs_of_other_tasks_or_attack_configs_are_never_averaged(tmp_path):
    write_row(tmp_path / "a", "finetune", "fine-tune", 1, "F" * 10 + "S" * 90, task="sst2")
    write_row(tmp_path / "b", "finetune", "fine-tune", 2, "F" * 50 + "S" * 50, task="qnli")
    write_row(tmp_path / "c", "freelb", "FreeLB", 1, "F" * 10 + "S" * 90, resources="real")
    write_row(tmp_path / "d", "freelb", "FreeLB", 1, "F" * 10 + "S" * 90, resources="substitutes:model")
    table = report.summary_table(report.load_rows(str(tmp_path)), [])
    assert "fine-tune [A]" in table and "fine-tune [B]" in table and "FreeLB [A]" in table
    assert "finetune / fine-tune: 2 rows, not merged: they differ in task, test set" in table
    assert "freelb / FreeLB: 2 rows, not merged: they differ in attack configuration" in table
    assert "± " not in table.split("Notes:")[0]  # nothing was averaged


def test_paired_delta_and_exact_mcnemar_against_the_methods_own_baseline(tmp_path):
    from scipy.stats import binom

    base = "F" * 10 + "S" * 90  # robust on examples 0-9
    better = "FF" + "S" * 8 + "F" * 22 + "S" * 68  # loses 8 of those, gains 22 others: b = 22, c = 8
    write_row(tmp_path / "ft", "finetune", "fine-tune", 1, base)
    write_row(tmp_path / "fl", "freelb", "FreeLB", 1, better)
    rows = report.load_rows(str(tmp_path))
    groups = report.group(rows)
    (ft,) = [g for g in groups if g[0] == "finetune"]
    (fl,) = [g for g in groups if g[0] == "freelb"]
    assert report.find_baselines(groups, fl) == [ft]
    d = report.paired(groups[fl], groups[ft], "pwws")
    assert d["delta"] == pytest.approx(14.0) and (d["b"], d["c"]) == (22, 8)
    assert d["p"] == pytest.approx(2 * binom.cdf(8, 30, 0.5)) and d["p"] < 0.05
    assert d["lo"] < 14.0 < d["hi"] and d["significant"]
    same = report.paired(groups[ft], groups[ft], "pwws")
    assert same["delta"] == 0 and same["p"] == 1.0 and not same["significant"]
    table = report.summary_table(rows, [])
    assert "+14.0 [" in table and "] * vs fine-tune" in table
    assert "| freelb / FreeLB | finetune / fine-tune | pwws | 1 | 100 |" in table


def test_a_collapsed_predictor_is_marked_and_not_read_as_robust(tmp_path):
    write_row(tmp_path / "ft", "finetune", "fine-tune", 1, "F" * 10 + "S" * 90)
    write_row(tmp_path / "fl", "freelb", "FreeLB", 1, "F" * 50 + "K" * 50, predictions=[200, 0], clean=50.0)
    rows = report.load_rows(str(tmp_path))
    fine_tune, freelb = (next(r for r in rows if r["method"] == m) for m in ("finetune", "freelb"))
    assert report.collapsed(fine_tune) is None
    assert "one class takes 100%" in report.collapsed(freelb)
    near_majority = dict(fine_tune, test_predictions=[120, 80], clean_accuracy=51.0)
    assert "within 2 points of the majority class" in report.collapsed(near_majority)
    table = report.summary_table(rows, [])
    line = next(ln for ln in table.splitlines() if ln.startswith("| freelb"))
    assert "**(collapsed)**" in line and line.rstrip(" |").endswith("-")  # no Δ for a collapsed row
    assert "is collapsed (one class takes 100% of the predictions): its Aua is not robustness" in table


def test_seeds_column_counts_distinct_seeds(tmp_path):
    write_row(tmp_path / "a", "finetune", "fine-tune", 1, "F" * 10 + "S" * 90)
    write_row(tmp_path / "b", "finetune", "fine-tune", 1, "F" * 12 + "S" * 88)
    write_row(tmp_path / "c", "finetune", "fine-tune", 2, "F" * 14 + "S" * 86)
    line = next(ln for ln in report.summary_table(report.load_rows(str(tmp_path)), []).splitlines()
                if ln.startswith("| finetune"))
    assert "| 1,2 (3 runs) |" in line


def test_a_failed_recipe_and_a_partial_run_are_shown_as_such(tmp_path):
    write_row(tmp_path / "a", "finetune", "fine-tune", 1, "F" * 10 + "S" * 90)
    result = json.load(open(tmp_path / "a" / "results.json"))
    result["status"] = "partial"
    result["attacks"]["deepwordbug"] = {"recipe": "DeepWordBugGao2018", "error": "RuntimeError: forced | failure"}
    json.dump(result, open(tmp_path / "a" / "results.json", "w"))
    table = report.summary_table(report.load_rows(str(tmp_path)), [])
    line = next(ln for ln in table.splitlines() if ln.startswith("| finetune"))
    assert "fine-tune (partial)" in line and "FAILED: RuntimeError: forced / failure" in line


def write_search(folder, seed, scores, setting="ticket s=0.5", lam=7.0):
    import torch

    os.makedirs(folder)
    if scores is not None:  # None: a committed run, whose mask_scores.pt (4 bytes a gate) stays out of git
        torch.save(scores, os.path.join(folder, "mask_scores.pt"))
    curve = [{"step": 0, "sparsity/expected_l0": 0.96, "sparsity/binary_share": 0.0, "sparsity/eval_zero_share": 0.0},
             {"step": 10, "sparsity/expected_l0": 0.4, "sparsity/binary_share": 0.9, "sparsity/eval_zero_share": 0.5,
              "l0_over_adv": 0.8, "l0_wins_share": 0.75}]
    row = {"setting": setting, "extra": {"target_sparsity": 0.5}}
    result = {"method": "robust_ticket", "setting": setting, "task": "toy", "model": "tiny", "seed": seed,
              "extra": {"search": {"curve": curve, "steps": 10, "lambda_effective": lam}, "rows": [row]}}
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(result, f)


def test_mask_diagnostics_correlate_searches_and_compare_pruned_overlap_with_chance(tmp_path):
    import torch

    gen = torch.Generator().manual_seed(0)
    a = {"l1": torch.randn(200, 50, generator=gen), "l2": torch.randn(1000, generator=gen)}
    noisy = {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in a.items()}
    unrelated = {k: torch.randn(v.shape, generator=gen) for k, v in a.items()}
    write_search(tmp_path / "runs" / "s1", 1, a)
    write_search(tmp_path / "runs" / "s2", 2, noisy)
    write_search(tmp_path / "runs" / "l0", 1, unrelated, setting="w/o L0 s=0.5", lam=0.0)
    lines, plots = report.mask_diagnostics(str(tmp_path), str(tmp_path))
    text = "\n".join(lines)
    pairs = {frozenset(line.split(" | ")[0].strip("| ").split(" vs ")): line.split(" | ")[1:]
             for line in lines if " vs " in line}
    same = pairs[frozenset({"ticket (seed 1, lambda 7)", "ticket (seed 2, lambda 7)"})]
    other = pairs[frozenset({"ticket (seed 1, lambda 7)", "w/o L0 (seed 1, lambda 0)"})]
    assert float(same[0]) > 0.9 and float(same[1].strip(" |")) > 0.8  # correlated seeds: overlap far above 0.5
    assert abs(float(other[0])) < 0.05 and abs(float(other[1].strip(" |")) - 0.5) < 0.03  # unrelated: chance
    assert "| 50.0 | 90.0 | 0.960 → 0.400 | 75.0 |" in text and os.path.isfile(plots[0])
    assert "|---|---|---|---|---|---|" in text


def test_mask_diagnostics_read_search_json_of_a_run_cut_after_its_search(tmp_path):
    import torch

    folder = tmp_path / "runs" / "cut"
    write_search(folder, 1, {"l1": torch.randn(10, 10)})
    os.remove(folder / "results.json")
    (folder / "search.json").write_text(json.dumps({"curve": [
        {"step": 0, "sparsity/expected_l0": 0.96, "sparsity/binary_share": 0.0, "sparsity/eval_zero_share": 0.0},
        {"step": 5, "sparsity/expected_l0": 0.5, "sparsity/binary_share": 0.8, "sparsity/eval_zero_share": 0.4,
         "l0_over_adv": 0.1}], "steps": 5, "lambda_effective": 0.0}))
    (folder / "args.json").write_text(json.dumps({"seed": 3, "l0_lambda": 0, "sparsity": "0.3,0.7"}))
    lines, _ = report.mask_diagnostics(str(tmp_path), str(tmp_path))
    assert any(line.startswith("| w/o L0 (seed 3, lambda 0) | 5 | 40.0 | 80.0 |") for line in lines)


def test_a_search_without_its_mask_scores_keeps_its_row_but_joins_no_pair(tmp_path):
    import torch

    write_search(tmp_path / "runs" / "s1", 1, {"l1": torch.randn(10, 10)})
    write_search(tmp_path / "runs" / "s2", 2, None)
    for folder in ("s1", "s2"):  # a complete run's results.json holds its search; search.json is its copy
        result = json.load(open(tmp_path / "runs" / folder / "results.json"))
        (tmp_path / "runs" / folder / "search.json").write_text(json.dumps(result["extra"]["search"]))
    lines, _ = report.mask_diagnostics(str(tmp_path), str(tmp_path))
    assert [ln.split(" | ")[0] for ln in lines if ln.startswith("| ticket (seed")] == [
        "| ticket (seed 1, lambda 7)", "| ticket (seed 2, lambda 7)"]
    assert not any(" vs " in ln for ln in lines)


def test_a_robust_ticket_is_paired_with_fine_tune_and_its_controls_at_the_same_sparsity():
    bases = report.baselines_of("robust_ticket", "ticket s=0.7")
    assert bases[0] == ("robust_ticket", "fine-tune") and ("robust_ticket", "w/o adv s=0.7") in bases
    assert ("robust_ticket", "random s=0.7") in bases and ("robust_ticket", "w/o l0 s=0.7") in bases
    assert report.baselines_of("robust_ticket", "random s=0.7") == [("robust_ticket", "fine-tune"),
                                                                     ("finetune", "fine-tune")]


def test_the_early_bird_ticket_is_paired_with_freelb_first_and_with_fine_tune():
    bases = report.baselines_of("early_bird_adv", "early-bird ticket")
    assert bases[0] == ("early_bird_adv", "freelb") and ("early_bird_adv", "fine-tune") in bases


def test_the_rosearch_student_is_paired_with_the_accuracy_only_and_the_random_search():
    assert report.baselines_of("rosearch", "RoSearch student") == [
        ("rosearch", "accuracy-only search"), ("rosearch", "random search"), ("rosearch", "teacher")]
    assert report.baselines_of("rosearch", "random search") == [("rosearch", "teacher")]


def test_adapter_mixup_beta_plot_is_drawn_from_results_json_alone(tmp_path):
    points = [{"beta": b, "dev_clean": 80 + 3 * b, "adv_val": 20 * (1 - b), "objective": 50.0} for b in (0, 0.5, 1)]
    for seed, curve in ((1, points), (2, [])):  # a run without known attacks has an empty curve: skipped
        os.makedirs(tmp_path / f"run{seed}")
        with open(tmp_path / f"run{seed}" / "results.json", "w") as f:
            json.dump({"method": "adapter_mixup", "setting": "AdpMixup v2", "task": "sst2", "model": "m", "seed": seed,
                       "attacks": {}, "extra": {"beta_curve": {"points": curve, "csv": "beta_curve.csv"}}}, f)
    made = report.plot_curves(report.load_rows(str(tmp_path)), str(tmp_path))
    assert made == [str(tmp_path / "adapter_mixup_beta.png")] and os.path.getsize(made[0]) > 0
    (tmp_path / "adapter_mixup.log").write_text(
        "  projected training at equal epochs (3 for every stage; n=100, m=1, 10 adversarial each): AdpMixup 12s vs "
        "full AT 30s\n  projected training as flagged (...): AdpMixup 40s, full AT 30s\n")
    row = next(line for line in report.bench_table(str(tmp_path)).splitlines() if "equal epochs" in line)
    assert "| 12s vs 30s |" in row


def test_a_folder_of_early_bird_bench_searches_is_reported_with_draw_lr_and_plot(tmp_path, monkeypatch):
    import sys
    run = tmp_path / "runs" / "sst2__schedule1__1__0"
    os.makedirs(run)
    search = {"draw_epoch": 0.25, "draw_step": 522, "lr_share_at_draw": 0.81, "stop_epoch": 0.5, "converged": True,
              "stopped_at_cap": False, "schedule_steps": 2090,
              "window_distances": [{"epoch": 0.05 * i, "d_head": [0.2, 0.1], "d_ffn": [0.3, 0.05]} for i in range(5)]}
    with open(run / "bench.json", "w") as f:
        json.dump({"seed": 1, "search": search, "search_in_freelb_steps": 600.0, "projected_speedup": 2.5,
                   "flops_ratio": 0.6, "inference_speedup": 1.4}, f)
    cut = tmp_path / "runs" / "sst2__schedule2__1__0"  # killed mid-search: only its progress file
    os.makedirs(cut)
    with open(cut / "search_progress.json", "w") as f:
        json.dump({"schedule_steps": 4180, "steps_per_epoch": 2090, "window_distances": search["window_distances"],
                   "checkpoints": [{"step": 104, "epoch": 0.05, "lr_share": 0.5}]}, f)
    monkeypatch.setattr(sys, "argv", ["report.py", str(tmp_path)])
    report.main()  # no results.json at all: the searches alone are the report
    summary = (tmp_path / "summary.md").read_text()
    assert "| sst2__schedule1__1__0 | 1 | 2090 | 0.250 (522) | 0.81 | 0.500 | yes | no | 600.0 | 2.50x |" in summary
    assert (tmp_path / "early_bird_distance.png").exists() and "early_bird_distance.png" in summary
    assert "cut: sst2__schedule2__1__0 was stopped at epoch 0.050 (step 104 of a 4180-step schedule" in summary


def test_rosearch_students_correlate_probe_r_with_test_aua_and_count_collapsed_candidates(tmp_path):
    def student(setting, h, r, aua):
        return {"method": "rosearch", "setting": setting, "attacks": {"pwws": {"aua": aua}},
                "extra": {"best": {"R": r, "A": 80.0, "hash": h, "flops_per_token": 2e6},
                          "compression": {"total": 5.0, "non_embedding": 40.0}}}
    run = tmp_path / "runs" / "sst2__rosearch__3__1"
    os.makedirs(run)
    rows = [{**student("RoSearch student", "a", 30.0, 9.0), "seed": 3},
            {**student("accuracy-only search", "a", 30.0, 9.0), "seed": 3},  # the same student: counted once
            {**student("random search", "b", 20.0, 7.0), "seed": 3},
            {**student("hand-made student", "c", 10.0, 8.0), "seed": 3}]
    ours = [{"hash": "a", "A": 70.0, "A_floor": 66.0, "majority_share": 0.6},
            {"hash": "b", "A": 50.0, "A_floor": 66.0, "majority_share": 1.0}]
    (run / "history_rosearch.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ours))
    (run / "history_random-search.jsonl").write_text(json.dumps({**ours[1], "hash": "d"}) + "\n")
    text = "\n".join(report.rosearch_students(rows, str(tmp_path)))
    assert "over the 3 distinct students" in text and "pwws +0.50" in text  # R 30/20/10 vs Aua 9/7/8
    assert "| 3 | rosearch | 2 | 1 | 1 | – |" in text and "| 3 | random-search | 1 | 0 | 1 | 0 |" in text


def test_train_seconds_is_the_written_sum_or_the_training_phases():
    ticket = {"wall_clock": {"search": 10.0, "draw": 1.0, "finetune": 4.0, "train": 15.0, "total": 90.0}}
    assert report.train_seconds(ticket) == 15.0  # not 30: train is the sum of the phases beside it
    assert report.train_seconds({"wall_clock": {"search": 10.0, "retrain": 5.0, "evaluate": 99.0}}) == 15.0


def test_adapter_mixup_diagnostics_show_the_gate_beta_and_transfer_per_seed(tmp_path):
    def run(seed, passed, transfer):
        gate = {"n": 100, "aua_clean": 18.0, "aua_adversarial": 16.0 + 10 * passed, "delta": -2.0 + 10 * passed,
                "ci": [-8.0 + 10 * passed, 4.0 + 10 * passed], "passed": passed}
        rows = [{"key": "clean", "setting": "clean adapter", "transfer": {"pwws": transfer}},
                {"key": "v1", "setting": "AdpMixup v1 (beta=0.75)", "transfer": {"pwws": transfer + 10}}]
        extra = {"rows": rows, "gate": {"pwws": gate}, "beta_v1": 0.75, "v2_tuning": {"tau": 1.0, "head_start": 2.0},
                 "adversarial_data": {"pwws": {"successful": 1751, "attacked": 2500}},
                 "transfer_source": {"source": "independent"}}
        folder = tmp_path / f"run{seed}"
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({"method": "adapter_mixup", "seed": seed, "extra": extra}))

    run(1, False, 20.0)
    run(2, True, 30.0)
    text = "\n".join(report.adapter_mixup_diagnostics(str(tmp_path)))
    assert "| 1 | pwws 1,751 / 2,500 | pwws 18 → 16 %, -2.0 [-8.0, +4.0] (n=100) NOT passed | 0.75 | 1.0, 2.0 |" in text
    assert "(n=100) passed" in text  # seed 2
    assert "| clean adapter | 25.0 |" in text and "| AdpMixup v1 (beta=0.75) | 35.0 |" in text  # seeds averaged
    assert "against the independent adapter" in text


def test_attacks_filter_reports_one_recipe_across_runs_that_attacked_different_sets(tmp_path):
    # seed 1 attacked with pwws + pruthi in one run; seed 2 with pwws in one run and pruthi in another
    def run(folder, seed, attacks):
        write_row(tmp_path / folder, "finetune", "fine-tune", seed, "F" * 10 + "S" * 90)
        path = tmp_path / folder / "results.json"
        result = json.loads(path.read_text())
        result["attacks"] = {a: attack_entry(o) for a, o in attacks.items()}
        path.write_text(json.dumps(result))

    run("s1", 1, {"pwws": "F" * 10 + "S" * 90, "pruthi": "F" * 40 + "S" * 60})
    run("s2-known", 2, {"pwws": "F" * 30 + "S" * 70})
    run("s2-unknown", 2, {"pruthi": "F" * 60 + "S" * 40})
    unfiltered = report.group(report.load_rows(str(tmp_path)))
    assert len(unfiltered) == 3  # three attack sets: nothing merges
    for recipe, aua in (("pwws", 20.0), ("pruthi", 50.0)):
        rows = report.load_rows(str(tmp_path), [recipe])
        assert len(rows) == 2 and all(set(r["attacks"]) == {recipe} for r in rows)
        (rs,) = report.group(rows).values()  # one row, two seeds
        assert report.aua_interval(rs, recipe)[0] == pytest.approx(aua)


def test_report_cli_writes_the_filtered_summary_to_out(tmp_path):
    import subprocess
    import sys

    write_row(tmp_path / "runs" / "a", "finetune", "fine-tune", 1, "F" * 10 + "S" * 90)
    out = tmp_path / "view"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, os.path.join(root, "report.py"), str(tmp_path / "runs"), "--attacks", "pwws",
                    "--out", str(out)], check=True, capture_output=True)
    assert "fine-tune" in (out / "summary.md").read_text() and not (tmp_path / "runs" / "summary.md").exists()


def test_adapter_mixup_diagnostics_with_attacks_keep_the_runs_whose_rows_were_attacked_with_them(tmp_path):
    def run(name, attacked):
        rows = [{"key": "clean", "setting": "clean adapter", "attacks": {a: {"aua": 10.0} for a in attacked},
                 "transfer": {a: 20.0 + len(name) for a in attacked}}]
        extra = {"rows": rows, "gate": {}, "beta_v1": len(name), "transfer_source": {"source": "independent"}}
        (tmp_path / name).mkdir()
        result = {"method": "adapter_mixup", "seed": 2, "attacks": {}, "extra": extra}  # main row not attacked yet
        (tmp_path / name / "results.json").write_text(json.dumps(result))

    run("known", ["pwws"])
    run("unknown-run", ["pruthi"])
    text = "\n".join(report.adapter_mixup_diagnostics(str(tmp_path), ["pruthi"]))
    assert "| 2 |  | not run | 11 |" in text and "| 2 |  | not run | 5 |" not in text  # the pwws run left out
    assert "| row | pruthi |" in text and "pwws" not in text


def test_report_cli_merges_several_results_folders_into_one_summary(tmp_path):
    # methods run into separate folders (e.g. AdpMixup's own) make one cross-method report; failures of each are kept
    import subprocess
    import sys

    write_row(tmp_path / "main" / "runs" / "a", "finetune", "fine-tune", 1, "F" * 10 + "S" * 90)
    write_row(tmp_path / "adp" / "runs" / "b", "adapter_mixup", "clean adapter", 1, "F" * 30 + "S" * 70)
    os.makedirs(tmp_path / "adp" / "failed")
    (tmp_path / "adp" / "failed" / "adapter_mixup__2.txt").write_text("error: stopped by hand")
    rows = report.load_rows([str(tmp_path / "main"), str(tmp_path / "adp")])
    assert sorted(r["setting"] for r in rows) == ["clean adapter", "fine-tune"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, os.path.join(root, "report.py"), str(tmp_path / "main"), str(tmp_path / "adp")],
                   check=True, capture_output=True)
    text = (tmp_path / "main" / "summary.md").read_text()  # written to the first folder
    assert "| fine-tune |" in text and "| clean adapter |" in text and "error: stopped by hand" in text
    # one compact table per method, its failures in it
    assert text.count("| method | setting |") == 2 and "**finetune**" in text and "**adapter_mixup**" in text
    adp_table = text[text.index("**adapter_mixup**"):]
    assert "| clean adapter |" in adp_table and "FAILED (seed 2)" in adp_table and "| fine-tune |" not in adp_table


def test_the_clean_vs_aua_labels_of_a_tight_cluster_do_not_overlap():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    points = [(85.0 + 0.1 * (i % 3), 10.0 + 0.1 * (i // 3)) for i in range(9)] + [(50.0, 50.0)]
    ax.plot(*zip(*points), "o")
    boxes = report.place_labels(ax, points, [str(i + 11) for i in range(len(points))])
    plt.close(fig)
    overlap = [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i][0] < boxes[j][2] and
               boxes[j][0] < boxes[i][2] and boxes[i][1] < boxes[j][3] and boxes[j][1] < boxes[i][3]]
    assert overlap == []
    assert len({b[:2] for b in boxes}) == len(boxes)


def test_rosearch_front_keeps_the_undominated_candidates_and_is_drawn_from_the_histories(tmp_path):
    assert report.pareto_front([(1, 1), (2, 0), (0, 2), (1, 0.5), (2, 0), (0.5, 0.5)]) == [(0, 2), (1, 1), (2, 0)]
    run = tmp_path / "runs" / "sst2__rosearch__3__1"
    run.mkdir(parents=True)
    for label in ("rosearch", "accuracy-only"):
        with open(run / f"history_{label}.jsonl", "w") as f:
            for i in range(4):
                f.write(json.dumps({"A": 70.0 + i, "R": 20.0 - i, "A_floor": 65.0, "hash": f"{label}{i}"}) + "\n")
    with open(run / "results.json", "w") as f:
        json.dump({"setting": "RoSearch student", "extra": {"best": {"hash": "rosearch2"}, "rows": [
            {"setting": "accuracy-only search", "extra": {"best": {"hash": "accuracy-only3"}}}]}}, f)
    made = report.plot_curves([], str(tmp_path), str(tmp_path))
    assert [os.path.basename(p) for p in made] == ["rosearch_front.png"]
    assert os.path.getsize(made[0]) > 10_000
