import glob
import json
import os
import re
import subprocess
import sys
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from conftest import ROOT, needs_nltk

import adapter_mixup as am
import attacks
import common
import offline

TOY_TEXTS = ["the movie was really good", "a plot is very bad", "this film felt quite dull and boring",
             "the cast was brilliant", "overall the ending is lousy", "a story was pleasant"]


def adapted_tiny(tmp_path, n_slots=3, adapter_type="houlsby"):
    """Tiny BERT with n_slots adapter slots made different from each other (as if trained)."""
    model, tokenizer = common.load_model("tiny", 2, 64, str(tmp_path / "tiny"))
    mixture = am.add_adapters(model, n_slots, adapter_type, 4, "relu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k in range(n_slots):
            for p in am.adapter_params(model, k):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    model.eval()
    return model, tokenizer, mixture


def encode(tokenizer, texts=TOY_TEXTS):
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


def logits_of(model, mixture, enc, slots, beta=None):
    mixture.use(slots, beta)
    with torch.no_grad():
        return model(**enc).logits


def quick_args(tmp_path, *extra):
    return am.parse_args(["--task", "toy", "--model", "tiny", "--no-cuda", "--output-dir", str(tmp_path),
                          "--max-seq-length", "64", "--attacks", "none", "--max-train-examples", "64",
                          "--max-eval-examples", "32", "--epochs", "1", "--adv-epochs", "1", "--lr", "1e-2",
                          "--reduction-factor", "4", "--batch-size", "16", "--beta-grid-step", "0.5",
                          "--train-attacks", "deepwordbug", "--adv-train-examples", "6", "--gate-examples", "0",
                          *extra])


def test_beta_one_and_zero_reproduce_each_adapter_exactly(tmp_path):
    model, tokenizer, mixture = adapted_tiny(tmp_path)
    enc = encode(tokenizer)
    alone = [logits_of(model, mixture, enc, [k]) for k in (0, 1)]
    assert not torch.allclose(alone[0], alone[1])  # the slots really differ
    assert torch.equal(logits_of(model, mixture, enc, [0, 1], [1.0, 0.0]), alone[0])
    assert torch.equal(logits_of(model, mixture, enc, [0, 1], [0.0, 1.0]), alone[1])
    per_example = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(3, 1)  # alternate slots within one batch
    mixed = logits_of(model, mixture, enc, [0, 1], per_example)
    assert torch.equal(mixed[0::2], alone[0][0::2]) and torch.equal(mixed[1::2], alone[1][1::2])


def test_per_example_output_mixing_equals_building_the_mixed_weights(tmp_path):
    model, tokenizer, mixture = adapted_tiny(tmp_path, n_slots=4)
    enc = encode(tokenizer)
    beta = torch.distributions.Dirichlet(torch.ones(3)).sample((len(TOY_TEXTS),))
    mixed = logits_of(model, mixture, enc, [0, 1, 2], beta)
    for i in range(len(TOY_TEXTS)):
        am.merge_adapters(model, [0, 1, 2], beta[i].tolist(), 3)  # phi_mix written into slot 3
        built = logits_of(model, mixture, {k: v[i: i + 1] for k, v in enc.items()}, [3])
        assert torch.allclose(mixed[i: i + 1], built, atol=1e-5), (mixed[i], built)
    assert not torch.allclose(mixed, logits_of(model, mixture, enc, [0]), atol=1e-3)


def test_dynamic_beta_favours_the_confident_adapter_and_sums_to_one(tmp_path, toy_args):
    entropies = torch.tensor([[0.1, 0.6], [0.6, 0.1], [0.3, 0.3]])
    for rule in ("inverse-entropy", "softmax"):
        beta = am.dynamic_beta(entropies, rule)
        assert torch.allclose(beta.sum(-1), torch.ones(3))
        assert beta[0, 0] > beta[0, 1] and beta[1, 1] > beta[1, 0] and torch.isclose(beta[2, 0], beta[2, 1])
    assert torch.allclose(am.dynamic_beta(entropies)[:, 0], entropies[:, 1] / entropies.sum(1))  # m = 1 closed form
    model, tokenizer, mixture = adapted_tiny(tmp_path)
    with torch.no_grad():  # make adapter slot 1 far more confident: scale its classifier
        model.classifier.linears[1].weight.mul_(50), model.classifier.linears[1].bias.mul_(50)
    toy_args.beta_grid_step, toy_args.temperature, toy_args.head_start = 0.1, 1.0, 0.0
    for rule in ("inverse-entropy", "min-entropy"):
        predict = am.MixupPredictor(model, tokenizer, mixture, [0, 1], "dynamic", toy_args, torch.device("cpu"),
                                    nullcontext, rule)
        logits, beta = predict.run(TOY_TEXTS)
        assert np.allclose(beta.sum(1), 1) and (beta[:, 1] > beta[:, 0]).all()
        assert logits.shape == (len(TOY_TEXTS), 2) and predict.passes == (3 if rule == "inverse-entropy" else 11)


def test_backbone_bit_identical_and_other_sets_unchanged_after_training(tmp_path):
    args = quick_args(tmp_path)
    am.validate(args)
    run = common.start_run(args, am.METHOD)
    data = common.load_task(args)
    model, tokenizer = common.load_model("tiny", 2, 64, str(tmp_path / "tiny"))
    mixture = am.add_adapters(model, 2, "houlsby", 4, "relu")
    backbone = {n: p.clone() for n, p in model.named_parameters() if ".linears." not in n or "pooler" in n}
    backbone = {n: p for n, p in backbone.items() if ".linears." not in n}
    before = [am.adapter_state(model, k) for k in (0, 1)]
    rows = list(zip(common.texts_of(data, data.train), data.train["label"]))
    am.train_adapter(model, mixture, 0, rows[:32], rows[32:48], data, tokenizer, run, args, 1, 1e-2, "t")
    after = dict(model.named_parameters())
    assert backbone and all(torch.equal(p, after[n]) for n, p in backbone.items())
    assert not all(torch.equal(v, am.adapter_state(model, 0)[k]) for k, v in before[0].items())
    assert all(torch.equal(v, am.adapter_state(model, 1)[k]) for k, v in before[1].items())
    assert not any(p.requires_grad for p in model.parameters())


@needs_nltk
def test_adversarial_cache_round_trips_and_resumes(tmp_path, toy_args, monkeypatch):
    model, tokenizer, mixture = adapted_tiny(tmp_path, n_slots=1)
    predict = am.MixupPredictor(model, tokenizer, mixture, [0], None, toy_args, torch.device("cpu"),
                                nullcontext)
    samples = [(t, i % 2) for i, t in enumerate(TOY_TEXTS[:4])]
    path = str(tmp_path / "adv.jsonl")
    first = attacks.generate_adversarial("deepwordbug", predict, samples, ("sentence",), path, toy_args)
    assert [r["index"] for r in first] == [0, 1, 2, 3]
    assert {r["status"] for r in first} <= {"successful", "failed", "skipped"}
    lines = open(path).read().splitlines()
    with open(path, "w") as f:  # interrupted after two examples, in the middle of writing the third
        f.write("\n".join(lines[:2]) + "\n" + lines[2][:10])
    attacked = []
    real_build = attacks.build_attack

    def counting_build(*a, **k):
        attack = real_build(*a, **k)
        real_attack = attack.attack
        attack.attack = lambda example, label: attacked.append(example) or real_attack(example, label)
        return attack

    monkeypatch.setattr(attacks, "build_attack", counting_build)
    resumed = attacks.generate_adversarial("deepwordbug", predict, samples, ("sentence",), path, toy_args)
    assert attacked == [TOY_TEXTS[2], TOY_TEXTS[3]]
    assert resumed[:2] == first[:2] and [r["index"] for r in resumed] == [0, 1, 2, 3]  # cached lines kept as is
    attacked.clear()
    assert attacks.generate_adversarial("deepwordbug", predict, samples, ("sentence",), path, toy_args) == resumed
    assert attacked == []  # a finished cache is never attacked again


def test_bad_flags_end_with_one_line_and_exit_2(tmp_path):
    for flags, message in ((["--beta", "1.5"], "--beta must be in [0, 1], got 1.5"),
                           (["--beta", "often"], "--beta must be a number"),
                           (["--train-attacks", "pwws,nope"], "unknown attack 'nope' in --train-attacks"),
                           (["--bench-steps", "0"], "--bench-steps must be in [1, None], got 0"),
                           (["--adv-lr", "-1"], "--adv-lr must be in (0, None], got -1.0"),
                           (["--full-epochs", "0"], "--full-epochs must be in (0, None]"),
                           (["--pgd-radius", "0.5"], "--pgd-radius is not supported"),
                           (["--transfer-source", "independent"], "--transfer-source independent attacks the test")):
        with pytest.raises(common.UsageError, match=re.escape(message)):
            am.validate(quick_args(tmp_path, *flags))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "adapter_mixup.py"), "--beta", "-0.2"],
                         capture_output=True, text=True, cwd=str(tmp_path))
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == "error: --beta must be in [0, 1], got -0.2"


def fake_the_attacks(monkeypatch, successes):
    """Adversarial generation faked, so the real recipes' resources (NLTK data) are not needed, nor preflighted."""
    monkeypatch.setattr(attacks, "generate_adversarial", fake_generation(successes))
    monkeypatch.setattr(offline, "preflight", lambda *a, **k: None)


def fake_generation(successes):
    def generate(name, predict, samples, columns, path, args, resources=None):
        return [{"index": i, "label": y, "status": "successful" if i < successes else "failed", "original": t,
                 "perturbed": t.replace("good", "g00d").replace("bad", "b4d")} for i, (t, y) in enumerate(samples)]
    return generate


def test_empty_adversarial_set_is_reported_and_the_run_still_finishes(tmp_path, monkeypatch):
    fake_the_attacks(monkeypatch, 0)
    results = am.main(quick_args(tmp_path))
    extra = results["extra"]
    assert extra["known_attacks"] == [] and "no deepwordbug attack succeeded" in extra["warnings"][0]
    assert [r["key"] for r in extra["rows"]] == ["clean"] and results["clean_accuracy"] is not None
    again = am.main(quick_args(tmp_path))  # the same flags: the clean adapter comes back from the cache
    assert again["extra"]["training"]["clean"]["cached"].endswith(".pt")
    assert again["clean_accuracy"] == results["clean_accuracy"]


def test_quick_run_writes_every_row_curve_and_loadable_adapters(tmp_path, monkeypatch):
    fake_the_attacks(monkeypatch, 5)
    results = am.main(quick_args(tmp_path, "--beta", "dev", "--baseline", "full-at", "--full-epochs", "1"))
    rows = {r["key"]: r for r in results["extra"]["rows"]}
    assert list(rows) == ["clean", "adv-deepwordbug", "at", "soup", "ensemble", "v1", "v2", "full-at"]
    assert rows["ensemble"]["passes_per_example"] == 2
    assert rows["v2"]["passes_per_example"] == 3 and rows["v1"]["passes_per_example"] == 1
    assert rows["v2"]["params"]["trainable"] == 2 * rows["clean"]["params"]["trainable"]
    assert rows["full-at"]["params"]["trainable_pct_of_backbone"] == 100.0
    assert 0 < rows["clean"]["params"]["trainable_pct_of_backbone"] < 100
    share = results["extra"]["trainable_share"]  # the pooler dense (tiny BERT: hidden 64) is counted, and given
    assert share["pooler"] == 64 * 64 + 64 and share["per_adapter"] == rows["clean"]["params"]["trainable"]
    assert rows["v2"]["params"]["trainable_pct_without_pooler"] == pytest.approx(
        2 * 100 * (share["per_adapter"] - share["pooler"]) / results["extra"]["backbone_params"]["total"])
    assert results["setting"] == rows["v1"]["setting"] and results["extra"]["beta_v1"] in (0.0, 0.5, 1.0)
    assert [p["beta"] for p in results["extra"]["beta_curve"]["points"]] == [0.0, 0.5, 1.0]
    assert results["extra"]["adversarial_data"]["deepwordbug"]["kept_train"] == 4
    run = next(os.path.join(tmp_path, d) for d in os.listdir(tmp_path) if d.startswith("toy__"))
    assert os.path.isfile(os.path.join(run, "beta_curve.csv"))
    assert not os.path.exists(os.path.join(run, "beta_curve.png"))  # the beta plot is report.py's alone
    assert json.load(open(os.path.join(run, "results.json")))["extra"]["rows"][5]["key"] == "v1"
    # the checkpoint loads back into a fresh adapted model: same weights, same v2-free clean logits
    ckpt = torch.load(os.path.join(run, "adapters.pt"))
    model, tokenizer = common.load_model("tiny", 2, 64, str(tmp_path / "tiny"))
    am.add_adapters(model, len(ckpt["slots"]), "houlsby", 4, "relu")
    for k, name in enumerate(ckpt["slots"]):
        am.load_adapter_state(model, k, ckpt["state"][name])
    assert all(torch.equal(am.adapter_state(model, k)[t], v) for k, name in enumerate(ckpt["slots"])
               for t, v in ckpt["state"][name].items())
    assert any(f.startswith("clean_") for f in os.listdir(os.path.join(tmp_path, "adpmixup_cache")))


def test_v1_at_a_grid_end_reuses_that_adapters_attacks_instead_of_attacking_again(tmp_path, monkeypatch):
    fake_the_attacks(monkeypatch, 5)
    attacked = []

    def fake_robustness(predict, data, args, run, prefix, resources=None, row=None):
        attacked.append(prefix)
        with open(os.path.join(run.dir, f"{prefix}pwws.csv"), "w") as f:
            f.write("perturbed_text,ground_truth,result\n")
        metrics = dict(clean=90.0, aua=float(len(attacked)), suc=50.0, avg_queries=10.0, csv=f"{prefix}pwws.csv")
        return {"pwws": metrics}
    monkeypatch.setattr(attacks, "evaluate_robustness", fake_robustness)
    rows = {r["key"]: r for r in am.main(quick_args(tmp_path, "--beta", "1.0"))["extra"]["rows"]}
    assert "v1_" not in attacked and "soup_" in attacked and "v2_" in attacked
    assert rows["v1"]["attacks"] == rows["clean"]["attacks"] != rows["soup"]["attacks"]


def test_bench_reports_adapter_and_full_costs(tmp_path, capsys):
    out = am.main(quick_args(tmp_path, "--bench", "--bench-steps", "1"))
    assert set(out["timing"]) == {"full fine-tuning", "adapter set"}
    assert out["timing"]["adapter set"][1] < out["timing"]["full fine-tuning"][1]
    log = capsys.readouterr().out
    assert "inference passes per example" in log and "without)" in log
    # like with like: at equal epochs every stage runs --full-epochs; the flagged projection uses --epochs 1 here
    args = quick_args(tmp_path)
    steps = lambda n, epochs: np.ceil(n / args.batch_size) * epochs  # noqa: E731
    adapter_s, full_s = out["timing"]["adapter set"][0], out["timing"]["full fine-tuning"][0]
    equal, flagged = out["projected_seconds"]["equal_epochs"], out["projected_seconds"]["flagged"]
    assert equal["adpmixup"] == pytest.approx(adapter_s * (steps(64, 3) + steps(12, 3)))
    assert flagged["adpmixup"] == pytest.approx(adapter_s * (steps(64, 1) + steps(12, 1)))
    assert equal["full_at"] == flagged["full_at"] == pytest.approx(full_s * steps(70, 3))
    assert re.search(r"at equal epochs \(3 for every stage.*: AdpMixup \d+s vs full AT \d+s", log)


@needs_nltk
def test_textfooler_generation_runs_offline_with_injected_substitutes(tmp_path, toy_args):
    from conftest import minilm_or_skip

    resources = offline.offline_attack_resources(minilm_or_skip())  # neighbour table cached in TA_CACHE_DIR
    model, tokenizer, mixture = adapted_tiny(tmp_path, n_slots=1)
    predict = am.MixupPredictor(model, tokenizer, mixture, [0], None, toy_args, torch.device("cpu"), nullcontext)
    samples = [(t, 1) for t in TOY_TEXTS[:2]]
    records = attacks.generate_adversarial("textfooler", predict, samples, ("sentence",), str(tmp_path / "tf.jsonl"),
                                           toy_args, resources)
    assert [r["index"] for r in records] == [0, 1] and all(r["seconds"] >= 0 for r in records)


@needs_nltk
def test_adversarial_data_from_two_attack_workers_equals_one(tmp_path, toy_args, capsys, monkeypatch):
    model, tokenizer, mixture = adapted_tiny(tmp_path, n_slots=1)
    predict = am.MixupPredictor(model, tokenizer, mixture, [0], None, toy_args, torch.device("cpu"), nullcontext)
    samples = [(t, i % 2) for i, t in enumerate(TOY_TEXTS[:6])]

    def generate(workers, name):
        toy_args.attack_workers = workers
        rows = attacks.generate_adversarial("deepwordbug", predict, samples, ("sentence",), str(tmp_path / name),
                                            toy_args)
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    one = generate(1, "one.jsonl")
    calls, real = [], attacks.attack_in_workers
    monkeypatch.setattr(attacks, "attack_in_workers", lambda *a, **k: calls.append(a[5]) or real(*a, **k))
    assert generate(2, "two.jsonl") == one and calls == [2] and "died" not in capsys.readouterr().out
    assert all(isinstance(r["perturbed"], str) for r in one) and {r["status"] for r in one} != {"skipped"}


@needs_nltk
def test_pair_inputs_are_attacked_and_cached_as_pairs(tmp_path, toy_args):
    model, tokenizer, mixture = adapted_tiny(tmp_path, n_slots=2)
    toy_args.temperature, toy_args.beta_grid_step, toy_args.head_start = 1.0, 0.1, 0.0
    predict = am.MixupPredictor(model, tokenizer, mixture, [0, 1], "dynamic", toy_args, torch.device("cpu"),
                                nullcontext)
    pairs = [(("the movie was good", "a plot is bad"), 0), (("the cast was brilliant", "the story was fine"), 1)]
    assert predict([p for p, _ in pairs]).shape == (2, 2)
    records = attacks.generate_adversarial("deepwordbug", predict, pairs, ("premise", "hypothesis"),
                                           str(tmp_path / "pairs.jsonl"), toy_args)
    assert all(len(r["perturbed"]) == 2 and r["original"] == list(p) for r, (p, _) in zip(records, pairs))


def test_clean_adapter_cache_key_is_complete_and_a_cut_checkpoint_is_retrained(tmp_path, monkeypatch):
    fake_the_attacks(monkeypatch, 0)
    first = am.main(quick_args(tmp_path))
    cache = tmp_path / "adpmixup_cache"
    (path,) = [p for p in cache.iterdir() if p.name.startswith("clean_")]
    assert not [p for p in cache.iterdir() if ".tmp" in p.name]  # written under a temporary name
    for flags in (["--max-eval-examples", "24"], ["--eval-batch-size", "16"], ["--warmup", "0.2"],
                  ["--train-attacks", "deepwordbug,pwws"]):  # one more slot: phi_0 starts from other weights
        again = am.main(quick_args(tmp_path, *flags))  # each changes what phi_0 is or is selected on: trained anew
        assert "cached" not in again["extra"]["training"]["clean"], flags
    path.write_bytes(path.read_bytes()[:100])  # a checkpoint cut by a kill
    cut = am.main(quick_args(tmp_path))
    assert "cached" not in cut["extra"]["training"]["clean"] and cut["clean_accuracy"] == first["clean_accuracy"]
    assert am.main(quick_args(tmp_path))["extra"]["training"]["clean"]["cached"] == str(path)  # rewritten whole


def test_cached_training_trains_once_per_config_and_hands_the_saved_state_to_load(tmp_path):
    trained, loaded = [], []

    def train():
        trained.append(1)
        return {"seconds": 1.0}, {"0.weight": torch.full((2, 2), float(len(trained)))}

    def cached(config):
        return attacks.cached_training(str(tmp_path / "cache"), "clean", config, "[test] adapter", train, loaded.append)

    assert cached({"seed": 1}) == {"seconds": 1.0} and trained == [1] and loaded == []
    again = cached({"seed": 1})
    assert trained == [1] and again["cached"].endswith(".pt") and torch.equal(loaded[0]["0.weight"], torch.ones(2, 2))
    assert "cached" not in cached({"seed": 2}) and trained == [1, 1]  # another config: another file, trained


def test_adaptive_objective_is_the_mean_of_clean_accuracy_and_the_mean_aua():
    out = attacks.adaptive_objective(80.0, {"pwws": [True, False], "textfooler": [True, True, True, True]})
    assert out == {"dev_aua_pwws": 50.0, "dev_aua_textfooler": 100.0, "adaptive_objective": 77.5}


def test_adversarial_cache_key_covers_seed_and_substitutes(tmp_path, toy_args, monkeypatch):
    keys = []
    fake_the_attacks(monkeypatch, 0)
    fake = attacks.generate_adversarial

    def spy(name, predict, samples, columns, path, args, resources=None):
        keys.append(os.path.basename(path))
        return fake(name, predict, samples, columns, path, args, resources)

    monkeypatch.setattr(attacks, "generate_adversarial", spy)
    am.main(quick_args(tmp_path))
    am.main(quick_args(tmp_path, "--attack-seed", "7"))
    am.main(quick_args(tmp_path))
    assert keys[0] != keys[1] and keys[0] == keys[2]


@needs_nltk
def test_gate_attacks_phi0_and_the_adversarial_adapter_afresh_on_the_same_dev_sentences(tmp_path, monkeypatch):
    fake_the_attacks(monkeypatch, 5)
    results = am.main(quick_args(tmp_path, "--gate-examples", "12"))
    gate = results["extra"]["gate"]["deepwordbug"]
    assert gate["n"] == 12 and gate["ci"][0] <= gate["delta"] <= gate["ci"][1]
    assert gate["delta"] == pytest.approx(gate["aua_adversarial"] - gate["aua_clean"])
    assert gate["passed"] == (gate["ci"][0] > 0)
    assert gate["passed"] or any("is not more robust than the clean adapter" in w for w in results["extra"]["warnings"])


def test_output_ensemble_is_the_mean_of_the_single_adapters_probabilities(tmp_path, toy_args):
    model, tokenizer, mixture = adapted_tiny(tmp_path)
    predict = am.MixupPredictor(model, tokenizer, mixture, [0, 1, 2], "ensemble", toy_args, torch.device("cpu"),
                                nullcontext)
    logits = predict(TOY_TEXTS)
    enc = encode(tokenizer)
    probs = torch.stack([logits_of(model, mixture, enc, [k]).softmax(-1) for k in range(3)]).mean(0)
    assert np.allclose(np.exp(logits), probs.numpy(), atol=1e-5) and predict.passes == 3


def test_head_start_moves_v2_off_the_uniform_soup():
    entropies = torch.full((4, 3), 0.6)  # adapters that are small tweaks of phi_0: equal entropies
    for rule in ("inverse-entropy", "softmax"):
        assert torch.allclose(am.dynamic_beta(entropies, rule), torch.full((4, 3), 1 / 3))  # the soup
        beta = am.dynamic_beta(entropies, rule, 1.0, head_start=1.0)
        assert (beta[:, 0] >= 0.5 - 1e-6).all() and torch.allclose(beta.sum(1), torch.ones(4))
    assert torch.allclose(am.dynamic_beta(entropies, "inverse-entropy", head_start=1.0)[:, 0], torch.full((4,), 0.5))


@needs_nltk
def test_v1_and_v2_are_chosen_on_the_adaptive_dev_objective(tmp_path, monkeypatch):
    fake_the_attacks(monkeypatch, 5)
    results = am.main(quick_args(tmp_path, "--beta", "dev", "--beta-attack-examples", "8", "--v2-grid", "1:0,1:2",
                                 "--dynamic-rule", "softmax"))
    extra = results["extra"]
    points = extra["beta_curve"]["points"]
    assert all("dev_aua_deepwordbug" in p and "adaptive_objective" in p for p in points)
    best = max(points, key=lambda p: (p["adaptive_objective"], p["beta"]))
    assert extra["beta_v1"] == best["beta"]
    tuning = extra["v2_tuning"]
    assert len(tuning["tried"]) == 2 and (tuning["tau"], tuning["head_start"]) in ((1.0, 0.0), (1.0, 2.0))
    with pytest.raises(common.UsageError, match="--v2-grid tunes v2"):
        am.validate(quick_args(tmp_path, "--v2-grid", "1:0"))


def test_independent_transfer_source_is_another_adapter_than_phi0_and_is_cached(tmp_path, monkeypatch):
    fake_the_attacks(monkeypatch, 5)
    calls, fake = [], attacks.generate_adversarial

    def spy(name, predict, samples, columns, path, args, resources=None):
        calls.append((os.path.basename(path), predict.slots, predict(TOY_TEXTS), samples))
        return fake(name, predict, samples, columns, path, args, resources)

    monkeypatch.setattr(attacks, "generate_adversarial", spy)
    monkeypatch.setattr(attacks, "evaluate_robustness", lambda *a, **k: {})
    flags = ["--transfer-source", "independent", "--attacks", "deepwordbug", "--attack-examples", "8"]
    results = am.main(quick_args(tmp_path, *flags))
    (adv,) = [c for c in calls if c[0].startswith("adv_")]  # the training data: attacked on phi_0
    (transfer,) = [c for c in calls if c[0].startswith("transfer_")]
    assert transfer[1] != adv[1] and not np.allclose(transfer[2], adv[2])  # another slot, and not phi_0's outputs
    assert len(transfer[3]) == 8 and transfer[3] != adv[3]  # the seeded test sample, not the train subset
    source, rows = results["extra"]["transfer_source"], results["extra"]["rows"]
    assert source["source"] == "independent" and source["adapter"] != source["clean_adapter"]
    assert source["sets"]["deepwordbug"]["successful"] == 5
    assert all(list(r["transfer"]) == ["deepwordbug"] for r in rows)  # every row, phi_0 included, is scored
    calls.clear()
    again = am.main(quick_args(tmp_path, *flags))  # the same flags: the independent adapter and its sets from cache
    assert again["extra"]["training"]["independent"]["cached"].endswith(".pt")
    assert [c[0] for c in calls if c[0].startswith("transfer_")] == [transfer[0]]
    assert again["extra"]["transfer_source"]["adapter"] == source["adapter"]


@needs_nltk
def test_a_resumed_run_attacks_nothing_again_and_gives_the_same_rows(tmp_path, monkeypatch):
    fake_the_attacks(monkeypatch, 5)  # the training data faked; the dev and row attacks are real DeepWordBug
    flags = ["--attacks", "deepwordbug", "--attack-examples", "6", "--beta", "dev", "--beta-attack-examples", "4",
             "--gate-examples", "4", "--v2-grid", "1:0,1:1", "--baseline", "full-at", "--full-epochs", "1",
             "--dynamic-rule", "softmax"]
    first = am.main(quick_args(tmp_path, *flags))
    (run_dir,) = [os.path.dirname(p) for p in glob.glob(str(tmp_path / "toy__*" / "args.json"))]
    assert glob.glob(os.path.join(run_dir, "dev_deepwordbug_*.csv"))  # the gate / beta / v2 dev attacks, kept
    calls, attack_one = [], attacks.attack_one
    monkeypatch.setattr(attacks, "attack_one", lambda *a: calls.append(a) or attack_one(*a))
    again = am.main(quick_args(tmp_path, *flags, "--resume", run_dir))
    assert calls == []  # dev attacks, adversarial data and every row's attacks read back
    assert [r["attacks"]["deepwordbug"]["outcomes"] for r in again["extra"]["rows"]] == \
        [r["attacks"]["deepwordbug"]["outcomes"] for r in first["extra"]["rows"]]
    assert again["extra"]["beta_v1"] == first["extra"]["beta_v1"]
    more = am.main(quick_args(tmp_path, *flags, "--attacks", "deepwordbug,pruthi", "--resume", run_dir))
    assert calls and all(set(r["attacks"]) == {"deepwordbug", "pruthi"} for r in more["extra"]["rows"])  # added
    assert [r["attacks"]["deepwordbug"]["outcomes"] for r in more["extra"]["rows"]] == \
        [r["attacks"]["deepwordbug"]["outcomes"] for r in first["extra"]["rows"]]
    assert json.load(open(os.path.join(run_dir, "args.json")))["attacks"] == "deepwordbug,pruthi"
    with pytest.raises(common.UsageError, match="other flags"):
        am.main(quick_args(tmp_path, *flags[:-1], "inverse-entropy", "--resume", run_dir))


def test_the_partial_results_json_carries_the_diagnostics_before_the_last_row(tmp_path, monkeypatch):
    fake_the_attacks(monkeypatch, 5)
    real_full_at, seen = attacks.full_at_row, {}

    def full_at_row(*a, **k):  # the last row: results.json is still the partial one
        seen.update(json.load(open(next(tmp_path.glob("toy__*/results.json")))))
        return real_full_at(*a, **k)

    monkeypatch.setattr(attacks, "full_at_row", full_at_row)
    results = am.main(quick_args(tmp_path, "--beta", "dev", "--baseline", "full-at", "--full-epochs", "1"))
    assert seen["status"] == "partial" and [r["key"] for r in seen["extra"]["rows"]][-1] == "v2"
    for key in ("beta_v1", "adversarial_data", "beta_curve", "trainable_share"):
        assert seen["extra"][key] == results["extra"][key], key
