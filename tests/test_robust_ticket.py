# Tests of robust_ticket.py (tiny random BERT, toy task, CPU, offline).
import json
import math
import os

import pytest
import torch

import common
import offline
import robust_ticket as rt

QUICK = ["--task", "toy", "--model", "tiny", "--no-cuda", "--attacks", "none", "--max-seq-length", "32",
         "--max-train-examples", "32", "--max-eval-examples", "16", "--batch-size", "16", "--eval-batch-size", "32",
         "--epochs", "1", "--search-epochs", "1", "--retrain-epochs", "1", "--adv-steps", "2", "--lr", "1e-3"]


def tiny(num_labels=2):
    return offline.tiny_bert(num_labels, os.path.join("/tmp", "robust_ticket_test_tiny"))


def test_expected_l0_matches_monte_carlo():
    torch.manual_seed(0)
    gate = rt.HardConcreteGate((8,), 0.9)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-4.0, -2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 4.0]))
    gate.train()
    samples = torch.stack([gate() for _ in range(20000)])
    monte_carlo = (samples > 0).float().mean(0)
    assert torch.allclose(monte_carlo, gate.expected_l0().detach(), atol=0.015)
    assert ((samples >= 0) & (samples <= 1)).all() and (samples == 1).any() and (samples == 0).any()


def test_eval_gate_is_exactly_zero_or_one_beyond_2_398():
    gate = rt.HardConcreteGate((6,), 0.9)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-30.0, -3.0, -2.398, 2.398, 3.0, 30.0]))
    gate.eval()
    assert gate().tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert rt.EVAL_ZERO_LOG_ALPHA == pytest.approx(-2.398, abs=1e-3)
    with torch.no_grad():
        edge = rt.EVAL_ZERO_LOG_ALPHA - 1e-4
        gate.log_alpha.copy_(torch.tensor([edge, 0.0, 0.0, 0.0, 0.0, -edge]))
    assert gate()[0] == 0.0 and gate()[5] == 1.0
    with torch.no_grad():
        gate.log_alpha.fill_(0.0)
    assert 0 < gate()[0] < 1  # soft in between (the code's dev evaluation uses these soft gates)
    assert torch.allclose(rt.HardConcreteGate((3,), 0.9).eval()(), torch.full((3,), 0.9))  # --mask-init
    assert math.isclose(rt.HardConcreteGate((1,), 0.9).log_alpha.item(), math.log(5), rel_tol=1e-6)


def test_train_gate_draws_a_fresh_sample_every_forward():
    gate = rt.HardConcreteGate((1000,), 0.5).train()
    assert not torch.equal(gate(), gate())


def test_draw_prunes_exactly_round_s_times_n():
    torch.manual_seed(0)
    scores = {"a": torch.randint(0, 3, (7, 11)).float(), "b": torch.randn(13), "c": torch.zeros(5, 2)}  # many ties
    n = sum(v.numel() for v in scores.values())
    sparsities = [0.0, 0.3, 0.5, 0.7, 0.99]
    for s, masks in zip(sparsities, rt.draw_masks(scores, sparsities)):
        assert sum((~m).sum().item() for m in masks.values()) == round(s * n)
        assert all(masks[k].shape == v.shape for k, v in scores.items())
    # global bottom-k: every pruned score <= every kept score
    masks = rt.draw_masks(scores, [0.5])[0]
    pruned = torch.cat([scores[k][~m] for k, m in masks.items()])
    kept = torch.cat([scores[k][m] for k, m in masks.items()])
    assert pruned.max() <= kept.min()


def test_l0_penalty_global_mean_differs_from_per_matrix_mean():
    gates = {"small": rt.HardConcreteGate((2, 2), 0.9), "big": rt.HardConcreteGate((10, 10), 0.9)}
    with torch.no_grad():
        gates["small"].log_alpha.fill_(-10.0)  # ~0 expected L0
        gates["big"].log_alpha.fill_(10.0)  # ~1
    assert rt.l0_penalty(gates, "global").item() == pytest.approx(100 / 104, abs=1e-3)
    assert rt.l0_penalty(gates, "per-matrix").item() == pytest.approx(0.5, abs=1e-3)


def test_lambda_is_zero_for_10_percent_then_ramps_over_30_percent():
    args = rt.parse_args(QUICK)
    lams = [rt.lambda_at(t, 100, args) for t in (0, 10, 25, 40, 99)]
    assert lams == pytest.approx([0.0, 0.0, 0.25, 0.5, 0.5])


def test_masked_linears_cover_encoder_and_pooler_only():
    model, _ = tiny()
    names = [n for n, _ in rt.masked_linears(model)]
    assert len(names) == 2 * 6 + 1  # Q, K, V, attention output, FFN in, FFN out per layer + pooler
    assert "bert.pooler.dense" in names and not any("classifier" in n for n in names)
    with pytest.raises(common.UsageError, match="no nn.Linear layers to mask"):
        rt.masked_linears(torch.nn.Sequential(torch.nn.Embedding(5, 3)))


def test_folded_checkpoint_reloads_with_identical_logits(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model, tokenizer = tiny()
    model.eval()
    torch.manual_seed(0)
    scores = {n: torch.randn(m.weight.shape) for n, m in rt.masked_linears(model)}
    masks = rt.draw_masks(scores, [0.6])[0]
    enc = tokenizer(["the movie was good", "a really awful plot and dull acting"], padding=True, return_tensors="pt")
    # the masked model: binary gates (log alpha = +-20, the official code's drawn ticket) in eval mode
    gates = rt.attach_gates(model, 0.9)
    with torch.no_grad():
        for name, gate in gates.items():
            gate.log_alpha.copy_(masks[name].float() * 40 - 20)
        masked_logits = model(**enc).logits
    rt.detach_gates(model)
    rt.fold_mask(model, masks)
    with torch.no_grad():
        folded_logits = model(**enc).logits
    model.save_pretrained(tmp_path / "ticket")
    rt.save_mask(str(tmp_path / "mask.npz"), masks)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ticket").eval()
    with torch.no_grad():
        reloaded_logits = reloaded(**enc).logits
    assert torch.allclose(masked_logits, folded_logits, atol=1e-6)
    assert torch.allclose(folded_logits, reloaded_logits, atol=1e-6)  # eager vs sdpa attention: float rounding
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())
    layers = dict(rt.masked_linears(reloaded))
    assert all((layers[n].weight[~m] == 0).all() for n, m in masks.items())
    back = rt.load_mask(str(tmp_path / "mask.npz"))
    assert list(back) == list(masks) and all(torch.equal(back[n], masks[n]) for n in masks)
    assert os.path.getsize(tmp_path / "mask.npz") < sum(m.numel() for m in masks.values()) / 4  # bit-packed


def test_search_keeps_weights_bit_identical_and_learns_log_alpha(tmp_path):
    args = rt.parse_args(QUICK + ["--output-dir", str(tmp_path), "--search-epochs", "2"])
    run = common.start_run(args, rt.METHOD)
    data = common.load_task(args)
    model, tokenizer = common.load_model("tiny", 2, 32, str(tmp_path / "tiny"))
    enc = common.tokenize(data, data.train, tokenizer, 32)
    loader = common.make_loader(enc, tokenizer, 16, True, 0)
    dev = common.make_loader(common.tokenize(data, data.dev, tokenizer, 32), tokenizer, 32, False)
    before = common.state_copy(model)
    scores, search = rt.search_masks(model, loader, dev, run, args, common.adversary_from_args(args))
    after = model.state_dict()
    assert list(before) == list(after) and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert not any(isinstance(m, rt.MaskedLinear) for m in model.modules())  # gates detached again
    init = math.log(5)
    assert set(scores) == {n for n, _ in rt.masked_linears(model)}
    assert any(not torch.allclose(v, torch.full_like(v, init)) for v in scores.values())
    assert len(search["history"]) == 2 and 0 <= search["history"][-1]["sparsity/binary_share"] <= 1


def test_end_to_end_writes_results_with_all_three_stages(tmp_path):
    results = rt.main(rt.parse_args(QUICK + ["--output-dir", str(tmp_path), "--sparsity", "0.3,0"]))
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith("toy__")]
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["setting"] == results["setting"] == "ticket s=0.3"
    assert [r["setting"] for r in on_disk["extra"]["rows"]] == ["Fine-tune", "ticket s=0.3", "ticket s=0"]
    assert {"stage1_finetune", "stage2_search", "stage3_retrain", "eval", "total"} <= set(on_disk["wall_clock"])
    sp = on_disk["extra"]["sparsity"]
    assert sp["pruned"] == round(0.3 * sp["masked_weights"]) and on_disk["sparsity"] == sp["over_masked"]
    assert on_disk["extra"]["rows"][2]["sparsity"] == 0.0
    assert on_disk["clean_accuracy"] is not None and on_disk["extra"]["search"]["history"]
    # the exported ticket: retraining kept the pruned weights at exactly zero
    from transformers import AutoModelForSequenceClassification

    ticket = AutoModelForSequenceClassification.from_pretrained(run_dir / "ticket_s0.3")
    masks = rt.load_mask(str(run_dir / "ticket_s0.3" / "mask.npz"))
    layers = dict(rt.masked_linears(ticket))
    assert all((layers[n].weight[~m] == 0).all() and (layers[n].weight[m] != 0).all() for n, m in masks.items())
    # stage-2 artefacts load back: reuse the fine-tuned model and the mask scores, random-draw ablation, no FT row
    again = rt.main(rt.parse_args(QUICK + ["--output-dir", str(tmp_path / "b"), "--finetuned",
                                           str(run_dir / "finetuned"), "--mask-scores", str(run_dir / "mask_scores.pt"),
                                           "--skip-finetune-eval", "--sparsity", "0.3", "--no-rewind",
                                           "--retrain-adv"]))
    assert [r["setting"] for r in again["extra"]["rows"]] == ["ticket s=0.3"]
    assert again["extra"]["rewind"] is False and again["wall_clock"]["stage2_search"] < 5  # no search
    reused = rt.load_mask(str(next((tmp_path / "b").glob("toy__*")) / "ticket_s0.3" / "mask.npz"))
    assert all(torch.equal(reused[n], masks[n]) for n in masks)


def test_reseed_replays_the_same_data_order_for_every_draw():
    args = rt.parse_args(QUICK)
    data = common.load_task(args)
    _, tokenizer = tiny()
    loader = common.make_loader(common.tokenize(data, data.train, tokenizer, 32), tokenizer, 8, True, args.seed)
    rt.reseed(args.seed, loader)
    first = next(iter(loader))["input_ids"]
    next(iter(loader))  # consumes the generator, as stage 1 and the search do
    rt.reseed(args.seed, loader)
    assert torch.equal(first, next(iter(loader))["input_ids"])


def test_ablation_settings_are_named_for_the_report():
    assert rt.setting_name(rt.parse_args(QUICK + ["--adv-steps", "0"]), 0.7) == "w/o adv s=0.7"
    matched = rt.parse_args(QUICK + ["--adv-lr", "0", "--adv-init-mag", "0"])  # K gate samples, zero perturbation
    assert rt.setting_name(matched, 0.3) == "w/o adv s=0.3" and matched.adv_steps == 2
    assert rt.setting_name(rt.parse_args(QUICK + ["--l0-lambda", "0"]), 0.3) == "w/o L0 s=0.3"
    assert rt.setting_name(rt.parse_args(QUICK), 0.3) == "ticket s=0.3"
    assert rt.setting_name(rt.parse_args(QUICK + ["--draw", "magnitude"]), 0.7) == "magnitude s=0.7"
    assert rt.setting_name(rt.parse_args(QUICK + ["--draw", "random"]), 0.3) == "random s=0.3"


def test_magnitude_draw_prunes_the_smallest_fine_tuned_weights():
    model, _ = tiny()
    args = rt.parse_args(QUICK + ["--draw", "magnitude"])
    masks = rt.draw_masks(rt.draw_scores(model, args), [0.5])[0]
    layers = dict(rt.masked_linears(model))
    pruned = torch.cat([layers[n].weight[~m].abs() for n, m in masks.items()])
    kept = torch.cat([layers[n].weight[m].abs() for n, m in masks.items()])
    assert pruned.max() <= kept.min()


def test_a_draw_that_prunes_a_whole_matrix_is_named():
    model, _ = tiny()  # a pooler of tiny weights (as the untrained pooler of a sentence-transformers MiniLM)
    model.bert.pooler.dense.weight.data.mul_(1e-3)
    args = rt.parse_args(QUICK + ["--draw", "magnitude"])
    scores = rt.draw_scores(model, args)
    half_of_pooler = 0.5 * scores["bert.pooler.dense"].numel() / sum(v.numel() for v in scores.values())
    masks = rt.draw_masks(scores, [half_of_pooler, 0.5])
    assert rt.fully_pruned(masks[0]) == [] and rt.fully_pruned(masks[1]) == ["bert.pooler.dense"]


@pytest.mark.parametrize("argv, message", [
    (["--sparsity", "1.0"], "--sparsity must be in [0, 1), got 1.0"),
    (["--sparsity", "-0.1"], "--sparsity must be in [0, 1)"),
    (["--sparsity", "0.3,abc"], "--sparsity must be numbers"),
    (["--finetuned", "/nonexistent/ckpt"], "--finetuned /nonexistent/ckpt has no config.json"),
    (["--sparsity", "0.3,0.7,0.3"], "must list distinct values"),
    (["--sparsity", ","], "must list distinct values"),
    (["--mask-scores", __file__], "--mask-scores needs --finetuned"),
    (["--diag-points", "0"], "--diag-points must be"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        with common.usage_errors():
            rt.parse_args(QUICK + argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_bench_prints_both_ratios(tmp_path, capsys):
    argv = ["--bench", "--bench-steps", "1", "--bench-seq-length", "16", "--output-dir", str(tmp_path)]
    ratios = rt.main(rt.parse_args(QUICK + argv))
    assert ratios["search_over_dense"] > 0 and ratios["ticket_over_dense_inference"] > 0
    out = capsys.readouterr().out
    assert "mask-search step" in out and "folded ticket" in out


# ---- the mechanism: each core step has a test that fails when the step is deleted -----------------------------------
def _search(tmp_path, *flags, epochs="2"):
    """A stage-2 search on the tiny model (same seed, data order and gate noise for every call)."""
    args = rt.parse_args(QUICK + ["--output-dir", str(tmp_path), "--search-epochs", epochs, *flags])
    run = common.start_run(args, rt.METHOD)
    data = common.load_task(args)
    model, tokenizer = common.load_model("tiny", 2, 32, str(tmp_path / "tiny"))
    loader = common.make_loader(common.tokenize(data, data.train, tokenizer, 32), tokenizer, 16, True, 0)
    dev = common.make_loader(common.tokenize(data, data.dev, tokenizer, 32), tokenizer, 32, False)
    rt.reseed(args.seed, loader)
    scores, search = rt.search_masks(model, loader, dev, run, args, common.adversary_from_args(args))
    return torch.cat([v.flatten() for v in scores.values()]), search, model


def test_l0_penalty_lowers_log_alpha_and_its_push_is_logged(tmp_path):
    full_lambda = ["--lambda-startup", "0", "--lambda-warmup", "0"]
    without, s0, _ = _search(tmp_path / "a", "--l0-lambda", "0", *full_lambda)
    with_l0, s1, _ = _search(tmp_path / "b", "--l0-lambda", "50", *full_lambda)
    assert (with_l0 < without).float().mean() > 0.9 and (without - with_l0).mean() > 0.02
    assert all(p["l0_grad_norm"] == 0 for p in s0["curve"][1:]) and all(p["l0_grad_norm"] > 0 for p in s1["curve"][2:])
    assert all(p["l0_wins_share"] == 0 for p in s0["curve"][1:]) and s1["curve"][-1]["l0_wins_share"] > 0.5
    assert s1["curve"][-1]["sparsity/expected_l0"] < s0["curve"][-1]["sparsity/expected_l0"]
    assert [p["step"] for p in s1["curve"]] == [0, 1, 2, 3, 4] and s1["curve"][1]["adv_grad_norm"] > 0


def test_l0_normalise_is_one_for_bert_base_at_the_papers_steps_and_scales_with_size_and_steps():
    from transformers import BertConfig, BertForSequenceClassification

    with torch.device("meta"):
        model = BertForSequenceClassification(BertConfig())
    layers = rt.masked_linears(model)
    n = sum(m.weight.numel() for _, m in layers)
    assert len(layers) == 73 and n == rt.BERT_BASE_MASKED
    assert rt.l0_scale(n, rt.PAPER_SEARCH_STEPS, True) == 1.0 and rt.l0_scale(n // 8, 100, False) == 1.0
    assert rt.l0_scale(n // 8, rt.PAPER_SEARCH_STEPS // 10, True) == pytest.approx(10 / 8, rel=1e-4)
    args = rt.parse_args(QUICK + ["--l0-normalise"])
    assert rt.lambda_at(99, 100, args, scale=3.0) == pytest.approx(1.5)


def test_the_adversary_changes_the_search_and_the_matched_control_has_zero_perturbation(tmp_path):
    adversarial, s_adv, _ = _search(tmp_path / "a", "--adv-lr", "0.5", "--adv-init-mag", "0.5")
    matched, s_zero, _ = _search(tmp_path / "b", "--adv-lr", "0", "--adv-init-mag", "0")
    assert (adversarial - matched).abs().max() > 1e-3
    assert s_adv["adversary"]["steps"] == s_zero["adversary"]["steps"] == 2 and s_zero["adversary"]["lr"] == 0


def test_no_clipping_at_max_grad_norm_0_and_the_model_is_trainable_again(tmp_path):
    scores, _, model = _search(tmp_path, "--max-grad-norm", "0", "--l0-lambda", "0")
    assert not torch.allclose(scores, torch.full_like(scores, math.log(5)))
    assert all(p.requires_grad for p in model.parameters())  # detach_gates restored stage 1's trainable weights


@pytest.mark.parametrize("select, expected_step", [("dev", 4), ("last", 6)])
def test_search_select_dev_keeps_the_best_dev_epoch_and_last_the_final_one(tmp_path, monkeypatch, select,
                                                                           expected_step):
    accuracies = iter([0.6, 0.9, 0.5])  # at the epoch ends, steps 2, 4, 6
    monkeypatch.setattr(rt, "evaluate_accuracy", lambda *a, **k: next(accuracies))
    _, search, _ = _search(tmp_path, "--search-select", select, epochs="3")
    assert [h["step"] for h in search["history"]] == [2, 4, 6] and search["selected_step"] == expected_step


def test_stage3_rewinds_to_pretrained_weights_and_the_export_equals_the_in_memory_ticket(tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    at_retrain, in_memory = {}, {}
    real_finetune, real_evaluate = rt.finetune, rt.evaluate_model
    enc = None

    def spy_finetune(model, *a, tag="", **k):
        if tag.startswith("retrain"):
            at_retrain[tag] = common.state_copy(model)
        return real_finetune(model, *a, tag=tag, **k)

    def spy_evaluate(model, tokenizer, data, args, run, res, prefix=""):
        nonlocal enc
        enc = tokenizer(["the movie was good", "awful plot and dull acting"], padding=True, return_tensors="pt")
        with torch.no_grad():
            in_memory[prefix] = model.eval()(**enc).logits.clone()
        return real_evaluate(model, tokenizer, data, args, run, res, prefix=prefix)

    monkeypatch.setattr(rt, "finetune", spy_finetune)
    monkeypatch.setattr(rt, "evaluate_model", spy_evaluate)
    rt.main(rt.parse_args(QUICK + ["--output-dir", str(tmp_path), "--sparsity", "0.5"]))
    run_dir = next(tmp_path.glob("toy__*"))
    theta0 = offline.tiny_bert(2, str(tmp_path / "t0"))[0].state_dict()
    finetuned = AutoModelForSequenceClassification.from_pretrained(run_dir / "finetuned").state_dict()
    masks = rt.load_mask(str(run_dir / "ticket_s0.5" / "mask.npz"))
    state = at_retrain["retrain_s0.5"]
    for name, keep in masks.items():
        w = state[name + ".weight"]
        assert torch.equal(w[keep], theta0[name + ".weight"][keep]) and (w[~keep] == 0).all()
        assert not torch.equal(w[keep], finetuned[name + ".weight"][keep])  # stage 1 moved them: rewind matters
    reloaded = AutoModelForSequenceClassification.from_pretrained(run_dir / "ticket_s0.5").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**enc).logits, in_memory["ticket_s0.5_"], atol=1e-5)


def test_draw_beyond_the_learned_zero_share_warns_and_is_recorded(tmp_path, capsys):
    results = rt.main(rt.parse_args(QUICK + ["--output-dir", str(tmp_path), "--sparsity", "0.5",
                                             "--skip-finetune-eval"]))
    assert "warning: the search drove only" in capsys.readouterr().out
    extra = results["extra"]
    assert extra["draw_beyond_learned"] is True and 0 <= extra["learned_zero_share"] < 0.5
    assert [p["step"] for p in extra["search"]["curve"]] == [0, 1, 2]  # 2 steps: the 20 diag points collapse


def test_the_same_seed_draws_the_same_mask_scores_twice(tmp_path):
    """Seeds reproduce (at a fixed thread count: 1 vs 2 threads moves log alpha by ~1e-6, which a long search with
    hard thresholds can amplify; docs/robust_ticket.md)."""
    scores = []
    for name in ("a", "b"):
        rt.main(rt.parse_args(QUICK + ["--output-dir", str(tmp_path / name), "--sparsity", "0.5"]))
        scores.append(torch.load(next((tmp_path / name).glob("toy__*/mask_scores.pt"))))
    assert scores[0].keys() == scores[1].keys() and all(torch.equal(scores[0][k], scores[1][k]) for k in scores[0])
    assert any(not torch.equal(v, v.flatten()[0].expand_as(v)) for v in scores[0].values())  # the search moved them
