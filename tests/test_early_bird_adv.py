# Tests of early_bird_adv.py (EarlyRobust): masks, convergence stop, pruning equivalence, save/load, a tiny run.
import json
import re
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import early_bird_adv as eb

torch.set_num_threads(1)  # the CI box is shared: one intra-op thread is several times faster than two here
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--task", "toy", "--model", "tiny", "--no-cuda", "--max-seq-length", "64", "--attacks", "none",
        "--max-train-examples", "160", "--max-eval-examples", "64", "--batch-size", "16", "--eval-batch-size", "64"]


def tiny_model(tmp_path):
    model, tokenizer = common.load_model("tiny", 2, 64, str(tmp_path / "tiny"))
    return model.eval(), tokenizer


def toy_batch(tokenizer):
    enc = tokenizer(["the movie was very good", "a plot is quite dull and boring", "this film felt great"],
                    padding=True, return_tensors="pt")
    return dict(enc)


def test_mask_distance_is_normalised_hamming():
    a = np.array([[1, 1, 0, 0]], dtype=bool)
    assert eb.mask_distance(a, a) == 0.0
    assert eb.mask_distance(a, np.array([[1, 0, 0, 1]], dtype=bool)) == 0.5
    assert eb.mask_distance(a, ~a) == 1.0


def test_draw_hits_exact_counts():
    rng = np.random.default_rng(0)
    heads = eb.head_mask_from_gates(rng.random((12, 12)), 0.166667)
    ffn = eb.ffn_mask_from_gates(rng.random((12, 3072)), 0.4)
    assert (~heads).sum() == 24 and (~ffn).sum() == 14746  # the released bert-base counts
    assert (~eb.head_mask_from_gates(rng.random((3, 4)), 0.5, "layer")).sum(1).tolist() == [2, 2, 2]


def test_one_head_per_layer_guard_keeps_a_head_in_every_layer():
    gates = np.array([[0.1, 0.2, 0.3, 0.4], [0.9, 0.8, 0.95, 0.85]])  # the global ranking would empty layer 0
    keep = eb.head_mask_from_gates(gates, 0.5)
    assert keep.sum(1).tolist() == [1, 3]
    assert keep[0].tolist() == [False, False, False, True]  # the largest gate of the emptied layer survives
    assert (~keep).sum() == 4


def masks_of(history):
    heads = [eb.head_mask_from_gates(h, 0.25) for h, _ in history]
    return heads, [eb.ffn_mask_from_gates(f, 0.4) for _, f in history]


def test_stop_rule_draws_the_first_checkpoint_stable_over_the_window():
    rng = np.random.default_rng(1)
    # checkpoints 0-2: random gates (masks keep changing); from checkpoint 3 on the gates only drift slightly
    stable = (rng.random((2, 4)), rng.random((2, 20)))
    history = [(rng.random((2, 4)), rng.random((2, 20))) for _ in range(3)]
    history += [(stable[0] + 1e-4 * k, stable[1] + 1e-4 * k) for k in range(6)]
    heads, ffn = masks_of(history)
    assert eb.draw_index(heads, ffn, epsilon=0.05, window=5) == 3
    assert eb.draw_index(heads[:8], ffn[:8], epsilon=0.05, window=5) is None  # look-ahead not complete yet


def test_stop_rule_never_converges_on_changing_masks():
    rng = np.random.default_rng(2)
    heads, ffn = masks_of([(rng.random((2, 4)), rng.random((2, 20))) for _ in range(12)])
    assert eb.draw_index(heads, ffn, epsilon=0.01, window=3) is None


def test_gates_at_one_leave_the_model_unchanged(tmp_path):
    model, tokenizer = tiny_model(tmp_path)
    batch = toy_batch(tokenizer)
    with torch.no_grad():
        plain = model(**batch).logits
        gated = eb.GatedBert(model).eval()(**batch).logits
    assert torch.allclose(plain, gated, atol=1e-6)


@pytest.mark.parametrize("rewind", [True, False])
def test_pruned_model_matches_gated_model_with_pruned_gates_zeroed(tmp_path, rewind):
    model, tokenizer = tiny_model(tmp_path)
    batch = toy_batch(tokenizer)
    gated = eb.GatedBert(model).eval()
    rng = np.random.default_rng(0)
    head_gates, ffn_gates = rng.uniform(0.5, 1.5, (2, 4)), rng.uniform(0.5, 1.5, (2, 128))
    head_keep, ffn_keep = eb.head_mask_from_gates(head_gates, 0.25), eb.ffn_mask_from_gates(ffn_gates, 0.4)
    scale_h, scale_f = (np.ones_like(head_gates), np.ones_like(ffn_gates)) if rewind else (head_gates, ffn_gates)
    with torch.no_grad():
        gated.head_gates.copy_(torch.tensor(scale_h * head_keep, dtype=torch.float32))
        gated.ffn_gates.copy_(torch.tensor(scale_f * ffn_keep, dtype=torch.float32))
        expected = gated(**batch).logits
        pruned = eb.prune_model(gated.remove(), head_keep, ffn_keep, *(None, None) if rewind else (scale_h, scale_f))
        got = pruned.eval()(**batch).logits
    assert [layer.intermediate.dense.out_features for layer in pruned.bert.encoder.layer] == ffn_keep.sum(1).tolist()
    heads = [layer.attention.self.num_attention_heads for layer in pruned.bert.encoder.layer]
    assert heads == head_keep.sum(1).tolist()
    assert torch.allclose(expected, got, atol=1e-5)
    assert eb.flops_per_token(pruned, 64) < eb.flops_per_token(tiny_model(tmp_path)[0], 64)


def test_saved_ticket_reloads_with_per_layer_widths(tmp_path):
    model, tokenizer = tiny_model(tmp_path)
    batch = toy_batch(tokenizer)
    head_keep = np.array([[True, False, True, True], [False, True, True, True]])
    ffn_keep = np.zeros((2, 128), dtype=bool)
    ffn_keep[0, :40], ffn_keep[1, 10:110] = True, True
    eb.prune_model(model, head_keep, ffn_keep)
    eb.save_ticket(model, tokenizer, str(tmp_path / "ticket"), head_keep, ffn_keep)
    loaded, _ = eb.load_ticket(str(tmp_path / "ticket"))
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, loaded(**batch).logits, atol=1e-6)
    assert [layer.intermediate.dense.out_features for layer in loaded.bert.encoder.layer] == [40, 100]


@pytest.mark.parametrize("flags,message", [
    (["--prune-heads", "1.0"], "--prune-heads must be in [0, 1)"),
    (["--prune-ffn", "-0.1"], "--prune-ffn must be in [0, 1)"),
    (["--epsilon", "0"], "--epsilon must be in (0, 1]"),
    (["--head-scope", "layer", "--prune-heads", "0.9"], "removes all 4 heads"),
])
def test_bad_input_is_a_one_line_error(tmp_path, flags, message):
    args = eb.parse_args(TINY + ["--output-dir", str(tmp_path)] + flags)
    with pytest.raises(common.UsageError, match=re.escape(message)):
        eb.validate_args(args)
        eb.check_ratios_fit(tiny_model(tmp_path)[0].config, args)


def test_bad_input_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "early_bird_adv.py", "--epsilon", "-1", "--output-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --epsilon must be in (0, 1], got -1.0"]


def test_tiny_run_stops_early_and_writes_results(tmp_path):
    flags = TINY + ["--lr", "1e-3", "--search-lr", "1e-3", "--epochs", "1", "--adv-steps", "2", "--check-every", "0.1",
                    "--window", "2", "--epsilon", "0.5", "--search-epochs", "2", "--max-search-epochs", "2"]
    eb.main(eb.parse_args(flags + ["--output-dir", str(tmp_path), "--with-baselines"]))
    (run_dir,) = [d for d in tmp_path.iterdir() if d.name.startswith("toy__")]
    results = json.loads((run_dir / "results.json").read_text())
    extra = results["extra"]
    assert results["setting"] == "early-bird ticket" and extra["converged"] and not extra["stopped_at_cap"]
    assert extra["gate_spread_at_draw"]["head"] > 0 and extra["gate_spread_at_draw"]["ffn"] > 0  # gates moved
    assert extra["schedule_steps"] == 2 * 10 and 0 < extra["lr_share_at_draw"] <= 1
    assert extra["draw_epoch"] < extra["stop_epoch"] < 2.0  # stopped online, long before the cap
    assert len(extra["window_distances"]) >= 1 and len(extra["distance_matrix"]["head"]) == len(extra["checkpoints"])
    # the online stop is the offline rule applied to the recorded masks, judged `window` checkpoints later
    d = extra["distance_matrix"]
    offline = next(g for g in range(len(d["head"]) - 2) if all(d[u][g][g + k] < 0.5 for u in d for k in (1, 2)))
    assert extra["draw_checkpoint"] == offline and len(extra["checkpoints"]) == offline + 3
    progress = json.loads((run_dir / "search_progress.json").read_text())  # written at every checkpoint
    assert progress["checkpoints"] == extra["checkpoints"] and progress["window_distances"] == extra["window_distances"]
    assert set(results["wall_clock"]) >= {"search", "draw", "finetune", "train", "total"}
    assert [r["setting"] for r in extra["rows"]] == ["early-bird ticket", "FreeLB", "fine-tune"]
    assert extra["speedup_vs_freelb"] > 0 and extra["flops_ratio"] < 1
    assert results["params"]["total"] < extra["rows"][1]["params"]["total"]
    model, _ = eb.load_ticket(str(run_dir / "ticket"))
    assert common.count_params(model)["total"] == results["params"]["total"]
    # side by side = alone: a separate --baseline finetune run reproduces the fine-tune row
    eb.main(eb.parse_args(flags + ["--output-dir", str(tmp_path / "alone"), "--baseline", "finetune"]))
    (path,) = (tmp_path / "alone").glob("toy__*/results.json")
    assert json.loads(path.read_text())["dev_accuracy"] == extra["rows"][2]["dev_accuracy"]


def test_bench_prints_ratios(tmp_path, capsys):
    import bench

    search = ["--adv-steps", "2", "--check-every", "0.2", "--window", "1", "--max-search-epochs", "0.5"]
    bench.bench_early_bird(eb.parse_args(TINY + search + ["--output-dir", str(tmp_path), "--bench",
                                                          "--bench-steps", "2"]))
    out = capsys.readouterr().out
    for key in ("projected_speedup", "inference_speedup", "flops_ratio", "search_in_freelb_steps"):
        assert f"[bench] {key}" in out
    (path,) = tmp_path.glob("*/bench.json")  # the drawn structure is kept, so a later run can fine-tune that ticket
    ticket = json.loads(path.read_text())["ticket"]
    assert sum(ticket["heads_kept"]) == sum(map(sum, ticket["head_mask"])) > 0
    assert ticket["ffn_widths"] == [len(k) for k in ticket["ffn_kept_indices"]]
    # --ticket-from: that structure rewound, pruned and fine-tuned without a search of its own
    with pytest.raises(common.UsageError, match="other flags: adv_steps 2 vs 5"):  # a search unlike this run's
        eb.main(eb.parse_args(TINY + ["--output-dir", str(tmp_path / "other"), "--ticket-from", str(path)]))
    eb.main(eb.parse_args(TINY + search + ["--output-dir", str(tmp_path / "from"), "--epochs", "1", "--ticket-from",
                                           str(path), "--with-baselines"]))
    (res,) = (tmp_path / "from").glob("*/results.json")
    results = json.loads(res.read_text())
    assert results["extra"]["heads_kept"] == ticket["heads_kept"]
    assert results["extra"]["ffn_widths"] == ticket["ffn_widths"]
    assert results["extra"]["ticket_from"] == str(path)
    assert results["wall_clock"]["search"] == json.loads(path.read_text())["search"]["seconds"] > 0
    assert [r["setting"] for r in results["extra"]["rows"]] == ["early-bird ticket", "FreeLB", "fine-tune"]
    assert "speedup_vs_freelb" not in results["extra"]  # its search was timed in another process


def test_ticket_from_refuses_a_mask_of_another_shape_or_no_rewind(tmp_path):
    bad = tmp_path / "ticket.json"
    bad.write_text(json.dumps({"head_mask": [[1, 1]], "ffn_kept_indices": [[0]]}))
    with pytest.raises(common.UsageError, match="do not fit"):
        eb.main(eb.parse_args(TINY + ["--output-dir", str(tmp_path), "--ticket-from", str(bad)]))
    with pytest.raises(common.UsageError, match="needs --rewind"):
        eb.validate_args(eb.parse_args(TINY + ["--ticket-from", str(bad), "--no-rewind"]))
    with pytest.raises(common.UsageError, match="no such file"):
        eb.validate_args(eb.parse_args(TINY + ["--ticket-from", str(tmp_path / "none.json")]))
    with pytest.raises(common.UsageError, match="--bench runs its own search"):
        eb.validate_args(eb.parse_args(TINY + ["--ticket-from", str(bad), "--bench"]))
    model, _ = tiny_model(tmp_path)
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    negative = {"head_mask": [[1] * n_heads] * n_layers, "ffn_kept_indices": [[-1]] * n_layers}
    bad.write_text(json.dumps(negative))
    with pytest.raises(common.UsageError, match="do not fit"):
        eb.drawn_ticket(str(bad), model.config, eb.parse_args(TINY))
    bad.write_text(json.dumps({"search": {"seconds": 1.0}}))  # a bench.json from before it stored the ticket
    with pytest.raises(common.UsageError, match="run that search again"):
        eb.drawn_ticket(str(bad), model.config, eb.parse_args(TINY))


def test_online_search_reports_never_converged_and_draws_final_gates(tmp_path, capsys):
    args = eb.parse_args(TINY + ["--output-dir", str(tmp_path), "--adv-steps", "1", "--check-every", "0.2",
                                 "--window", "2", "--epsilon", "1e-9", "--max-search-epochs", "1"])
    model, tokenizer = tiny_model(tmp_path)
    data = common.load_task(args)
    loader = common.make_loader(common.tokenize(data, data.train, tokenizer, 64), tokenizer, 16, True)
    run = common.start_run(args, eb.METHOD)
    search = eb.search_ticket(eb.GatedBert(model), loader, run, args, common.adversary_from_args(args))
    assert not search["converged"] and search["stop_epoch"] == 1.0 and search["stopped_at_cap"]
    assert search["draw_checkpoint"] is None and search["draw_step"] == search["stop_step"]  # the final gates
    out = capsys.readouterr().out
    assert "did not converge" in out and "the search stopped at its cap" in out


def test_baseline_run_feeds_the_speedup_of_a_ticket_run(tmp_path):
    base = TINY + ["--output-dir", str(tmp_path / "base"), "--epochs", "1", "--adv-steps", "2"]
    eb.main(eb.parse_args(base + ["--baseline", "freelb"]))
    (path,) = (tmp_path / "base").glob("toy__*/results.json")
    baseline = json.loads(path.read_text())
    assert baseline["setting"] == "FreeLB" and baseline["extra"]["rows"][0]["setting"] == "FreeLB"
    eb.main(eb.parse_args(TINY + ["--output-dir", str(tmp_path / "ticket"), "--epochs", "1", "--adv-steps", "2",
                                  "--draw-at", "0.2", "--baseline-results", str(path)]))
    (path,) = (tmp_path / "ticket").glob("toy__*/results.json")
    extra = json.loads(path.read_text())["extra"]
    assert extra["freelb_train_seconds"] == baseline["wall_clock"]["train"] and extra["speedup_vs_freelb"] > 0
    assert extra["draw_epoch"] == pytest.approx(0.2, abs=0.1) and extra["stop_epoch"] == extra["draw_epoch"]


def test_baseline_results_with_other_epochs_or_k_are_refused(tmp_path):
    base = TINY + ["--output-dir", str(tmp_path / "base"), "--epochs", "1", "--adv-steps", "2"]
    eb.main(eb.parse_args(base + ["--baseline", "freelb"]))
    (path,) = (tmp_path / "base").glob("toy__*/results.json")
    for flags, what in ((["--epochs", "2", "--adv-steps", "2"], "epochs 1.0 vs 2.0"),
                        (["--epochs", "1", "--adv-steps", "3"], "adv_steps 2 vs 3")):
        args = eb.parse_args(TINY + ["--output-dir", str(tmp_path), "--baseline-results", str(path)] + flags)
        with pytest.raises(common.UsageError, match=what):
            eb.validate_args(args)


def _search(tmp_path, *flags):
    args = eb.parse_args(TINY + ["--output-dir", str(tmp_path), "--adv-steps", "1", "--check-every", "0.1",
                                 "--search-lr", "1e-3", *flags])
    model, tokenizer = tiny_model(tmp_path)
    data = common.load_task(args)
    loader = common.make_loader(common.tokenize(data, data.train, tokenizer, 64), tokenizer, 16, True, 0)
    run = common.start_run(args, eb.METHOD)
    torch.manual_seed(0)
    gated = eb.GatedBert(model)
    return eb.search_ticket(gated, loader, run, args, common.adversary_from_args(args)), gated


def test_search_moves_the_gates_and_l1_shrinks_them(tmp_path):
    never = ["--epsilon", "1e-9", "--max-search-epochs", "0.5"]
    _, plain = _search(tmp_path / "a", "--l1-head", "0", "--l1-ffn", "0", *never)
    _, slim = _search(tmp_path / "b", "--l1-head", "0.5", "--l1-ffn", "0.5", *never)
    for gated in (plain, slim):
        assert (gated.head_gates != eb.GATE_INIT).any() and (gated.ffn_gates != eb.GATE_INIT).any()
    assert slim.ffn_gates.abs().mean() < plain.ffn_gates.abs().mean() - 1e-3
    assert slim.head_gates.abs().mean() < plain.head_gates.abs().mean() - 1e-3


def test_the_lr_schedule_spans_search_epochs_whatever_the_cap(tmp_path):
    never = ["--epsilon", "1e-9", "--search-epochs", "1"]
    short, _ = _search(tmp_path / "a", "--max-search-epochs", "0.3", *never)
    long, _ = _search(tmp_path / "b", "--max-search-epochs", "0.6", *never)
    assert short["schedule_steps"] == long["schedule_steps"] == 10
    shares = {c["step"]: c["lr_share"] for c in long["checkpoints"]}
    assert [c["lr_share"] for c in short["checkpoints"]] == [shares[c["step"]] for c in short["checkpoints"]]
    assert short["lr_share_at_stop"] > 0.5  # the cap cut the search, not the schedule
    with pytest.raises(common.UsageError, match="--max-search-epochs must be in"):
        eb.validate_args(eb.parse_args(TINY + ["--search-epochs", "0.5", "--max-search-epochs", "1"]))


def test_random_gates_never_converge_under_the_default_rule(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    heads, ffn = masks_of([(rng.random((12, 12)), rng.random((12, 3072))) for _ in range(40)])
    assert eb.draw_index(heads, ffn, epsilon=0.1, window=5) is None
    # end to end: gates re-drawn at random every step (nothing learned) never give a ticket; frozen gates neither
    real_penalty = eb.GatedBert.l1_penalty

    def random_gates(self, l1_head, l1_ffn):
        with torch.no_grad():
            self.head_gates.uniform_(), self.ffn_gates.uniform_()
        return real_penalty(self, l1_head, l1_ffn)

    monkeypatch.setattr(eb.GatedBert, "l1_penalty", random_gates)
    search, _ = _search(tmp_path / "a", "--max-search-epochs", "1")
    assert not search["converged"] and search["stopped_at_cap"]


def test_gates_that_never_moved_are_not_judged_however_loose_epsilon():
    rule = eb.StopRule(epsilon=0.9, window=2)
    equal = (np.ones((2, 4)), np.ones((2, 20)))  # ties rank by position: identical masks at every checkpoint
    masks = (eb.head_mask_from_gates(equal[0], 0.25), eb.ffn_mask_from_gates(equal[1], 0.4))
    assert [rule.add(*masks, equal, [0.1 * i for i in range(k + 1)]) for k in range(6)] == [None] * 6
    moved = (equal[0] + np.arange(4) * 1e-3, equal[1] + np.arange(20) * 1e-3)
    rule = eb.StopRule(epsilon=0.9, window=2)
    masks = (eb.head_mask_from_gates(moved[0], 0.25), eb.ffn_mask_from_gates(moved[1], 0.4))
    assert [rule.add(*masks, moved, [0.1 * i for i in range(k + 1)]) for k in range(3)] == [None, None, 0]


def test_stage3_starts_from_the_pretrained_weights_pruned(tmp_path, monkeypatch):
    starts = []
    real = eb.finetune

    def spy(model, *a, tag="", **k):
        if tag == "ticket":
            starts.append({k: v.clone() for k, v in model.state_dict().items()})
        return real(model, *a, tag=tag, **k)

    monkeypatch.setattr(eb, "finetune", spy)
    flags = TINY + ["--epochs", "1", "--adv-steps", "1", "--draw-at", "0.2", "--search-lr", "1e-2"]
    for rewind in ("--rewind", "--no-rewind"):
        eb.main(eb.parse_args(flags + ["--output-dir", str(tmp_path / rewind), rewind]))
    pretrained = tiny_model(tmp_path)[0].state_dict()
    for name in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.output.LayerNorm.weight"):
        assert torch.equal(starts[0][name], pretrained[name])  # rewound: theta_0 (never pruned tensors)
        assert not torch.equal(starts[1][name], pretrained[name])  # --no-rewind: the searched weights
