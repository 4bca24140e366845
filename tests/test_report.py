# report.py builds the comparison from results.json files alone: rows from extra.rows, mean ± std over seeds, failures.
import json
import os

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
