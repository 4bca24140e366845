# The evaluation layer a user can trust (issue 11): preflight before training, nothing finished is lost, per-example
# seeds and resume, and the small fixes (labels, heads, attention, bf16, requirements).
import argparse
import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, needs_nltk

import attacks
import common
import finetune
import offline


def tiny_attack(recipe, model, tokenizer):
    return attacks.build_attack(recipe, attacks.callable_wrapper(attacks.Predictor(model, tokenizer, 64, 32, "cpu")))


def cli(script, *argv, env_extra=None, cwd=ROOT):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


# ------------------------------------------------------------------------------------------------ preflight
def test_preflight_names_missing_tensorflow_hub_and_skips_it_with_substitutes(monkeypatch):
    real = offline.importlib.util.find_spec
    monkeypatch.setattr(offline.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorflow_hub" else real(name, *a))
    problems = offline.preflight_problems(["textfooler"])
    assert problems and "needs tensorflow_hub for the Universal Sentence Encoder" in problems[0]
    assert "pip install -r requirements.txt" in problems[0]
    with pytest.raises(common.UsageError, match="tensorflow_hub"):
        offline.preflight(["textbugger"])
    assert not any("tensorflow" in p for p in offline.preflight_problems(["textfooler"], substitutes="/some/model"))


def test_preflight_names_the_use_download_when_offline(monkeypatch):
    monkeypatch.setattr(offline.importlib.util, "find_spec", lambda name, *a: object())  # every package "installed"
    monkeypatch.setattr(offline, "reachable", lambda host, timeout=3.0: False)
    monkeypatch.setattr(offline, "use_cached", lambda: False)
    problems = offline.preflight_problems(["bert-attack"])
    assert any("Universal Sentence Encoder (https://tfhub.dev/" in p for p in problems)
    assert any("masked LM 'bert-base-uncased'" in p for p in problems)
    monkeypatch.setattr(offline, "use_cached", lambda: True)  # a cached USE is enough offline
    assert not any("Universal Sentence Encoder" in p for p in offline.preflight_problems(["textfooler"]))


def test_preflight_names_missing_nltk_data(monkeypatch):
    import nltk

    def find(path):
        if "wordnet" in path:
            raise LookupError(path)
        return path

    monkeypatch.setattr(nltk.data, "find", find)
    assert offline.preflight_problems(["deepwordbug"]) == []
    (problem,) = offline.preflight_problems(["pwws"])
    assert "NLTK data 'corpora/wordnet'" in problem and "nltk.downloader wordnet" in problem


@needs_nltk
def test_preflight_accepts_a_zipped_corpus_as_nltk_reads_it(tmp_path, monkeypatch):
    import shutil
    import nltk
    from nltk.corpus.reader import WordListCorpusReader

    source = nltk.data.find("corpora/stopwords")
    shutil.make_archive(str(tmp_path / "corpora" / "stopwords"), "zip", os.path.dirname(str(source)), "stopwords")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(LookupError):
        nltk.data.find("corpora/stopwords")  # only the zip is there ...
    reader = WordListCorpusReader(nltk.data.find("corpora/stopwords.zip/stopwords/"), ["english"])
    assert "the" in reader.words("english")  # ... and NLTK reads it
    assert offline.preflight_problems(["deepwordbug"]) == []
    (problem,) = offline.preflight_problems(["pwws"])  # WordNet is not in tmp_path at all
    assert "corpora/wordnet" in problem


def test_unrunnable_recipe_exits_2_in_one_line_before_any_run_folder(tmp_path):
    """In this offline sandbox TextFooler's USE and embeddings cannot be had: the script stops before training."""
    if not offline.preflight_problems(["textfooler"]):
        pytest.skip("TextFooler's resources are available here")
    proc = cli("robust_ticket.py", "--task", "toy", "--model", "tiny", "--attacks", "textfooler", "--output-dir",
               str(tmp_path / "runs"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --attacks textfooler needs") and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "runs")


# ------------------------------------------------------------------------------------------------ nothing lost
@needs_nltk
def test_failed_recipe_is_recorded_and_the_others_are_kept(tmp_path, monkeypatch):
    args = finetune.parse_args(["--task", "toy", "--model", "tiny", "--no-cuda", "--output-dir", str(tmp_path),
                                "--epochs", "1", "--lr", "3e-3", "--max-train-examples", "300",
                                "--max-eval-examples", "100", "--max-seq-length", "64", "--attacks",
                                "deepwordbug,pwws", "--attack-examples", "4", "--no-save-model"])
    real_build, seen = attacks.build_attack, {}

    def build(name, *a, **k):
        if name == "pwws":  # results.json already holds the finished recipe when the next one starts
            run_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
            seen.update(json.load(open(run_dir / "results.json")))
            raise RuntimeError("forced failure")
        return real_build(name, *a, **k)

    monkeypatch.setattr(attacks, "build_attack", build)
    monkeypatch.setattr(common, "RECIPE_FAILURES", [])
    monkeypatch.setattr(attacks, "RECIPE_FAILURES", common.RECIPE_FAILURES)
    results = finetune.main(args)
    assert seen["status"] == "partial" and seen["extra"]["rows"][0]["attacks"]["deepwordbug"]["n"] == 4
    assert results["attacks"]["deepwordbug"]["n"] == 4 and "outcomes" in results["attacks"]["deepwordbug"]
    assert results["attacks"]["pwws"]["error"] == "RuntimeError: forced failure"
    assert results["attacks"]["pwws"]["recipe"] == "PWWSRen2019"  # the config is kept next to the error
    on_disk = json.load(open(next(tmp_path.glob("*/results.json"))))
    assert on_disk["status"] == "recipes failed" and on_disk["attacks"]["pwws"]["error"]
    with pytest.raises(SystemExit) as exit_info:
        with common.usage_errors():
            pass
    assert exit_info.value.code == 1


@needs_nltk
def test_results_record_data_identity_attack_config_and_histograms(trained_tiny, tmp_path):
    args, data, run, model, tokenizer = trained_tiny
    row = common.results_template(args, "finetune", "fine-tune", model)
    attacks.evaluate_model(model, tokenizer, data, argparse.Namespace(**{**vars(args), "attacks": "deepwordbug"}),
                           run, row)
    assert row["data"]["task"] == "toy" and row["data"]["test"] == len(data.test)
    assert len(row["data"]["test_fingerprint"]) == 12 and row["max_seq_length"] == 64
    assert sum(row["test_predictions"]) == len(data.test) == sum(row["test_labels"])
    m = row["attacks"]["deepwordbug"]
    assert {k: m[k] for k in ("recipe", "attack_seed", "n_requested", "resources", "query_budget")} == {
        "recipe": "DeepWordBugGao2018", "attack_seed": 0, "n_requested": 12, "resources": "real", "query_budget": None}
    assert len(m["outcomes"]) == m["n"] == 12 and set(m["outcomes"]) <= set("SFK")
    assert m["aua"] == pytest.approx(100 * m["outcomes"].count("F") / 12)
    assert sum(m["predictions"]) == 12


# ------------------------------------------------------------------------------------------------ seeds, resume
@needs_nltk
@pytest.mark.parametrize("recipe", ["deepwordbug", "pwws", "pruthi"])
def test_an_examples_outcome_does_not_depend_on_the_examples_before_it(trained_tiny, recipe):
    _, data, _, model, tokenizer = trained_tiny
    attack = tiny_attack(recipe, model, tokenizer)
    samples = attacks.attack_sample(data, 10, 0)
    _, all_rows = attacks.run_attack(attack, samples, data.text_columns, attack_seed=0)
    _, tail_rows = attacks.run_attack(attack, samples, data.text_columns, attack_seed=0, indices=range(5, 10))
    assert tail_rows == all_rows[5:]
    assert any(r["result"] == "Successful" for r in all_rows)  # something was attacked, not only skipped


@needs_nltk
def test_a_killed_attack_resumes_without_attacking_twice(trained_tiny, tmp_path, monkeypatch):
    _, data, _, model, tokenizer = trained_tiny
    attack = tiny_attack("deepwordbug", model, tokenizer)
    samples = attacks.attack_sample(data, 8, 0)
    _, uninterrupted = attacks.run_attack(attack, samples, data.text_columns, str(tmp_path / "a.csv"), key="k")
    real_one, calls, killed = attacks.attack_one, [], []

    def one(*a):
        calls.append(a[4])
        if len(calls) == 6 and not killed:
            killed.append(True)
            raise KeyboardInterrupt  # killed in the middle of the sixth example
        return real_one(*a)

    monkeypatch.setattr(attacks, "attack_one", one)
    path = str(tmp_path / "b.csv")
    with pytest.raises(KeyboardInterrupt):
        attacks.run_attack(attack, samples, data.text_columns, path, key="k")
    calls.clear()
    summary, resumed = attacks.run_attack(attack, samples, data.text_columns, path, key="k")
    assert len(calls) == 3  # examples 5, 6, 7: the five finished ones are not attacked again
    strip = [{k: str(v) for k, v in r.items()} for r in uninterrupted]
    assert [{k: str(v) for k, v in r.items()} for r in resumed] == strip
    assert len(list(csv.DictReader(open(path)))) == 8
    calls.clear()
    attacks.run_attack(attack, samples, data.text_columns, path, key="another predictor")  # another key: fresh
    assert len(calls) == 8


# ------------------------------------------------------------------------------------------------ small fixes
def test_labels_outside_the_task_are_one_line_exit_2(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"s{i} good\t{i % 3}\n" for i in range(40)))
    (data / "dev.tsv").write_text("sentence\tlabel\na fine film\t1\n")
    proc = cli("finetune.py", "--task", "sst2", "--data-dir", str(data), "--model", "tiny", "--attacks", "none",
               "--no-cuda", "--output-dir", str(tmp_path / "runs"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "labels [2] outside [0, 2) for --task sst2" in proc.stderr.strip().splitlines()[-1]


def test_a_checkpoint_with_another_label_count_warns_by_name(tmp_path, capsys):
    model, tokenizer = offline.tiny_bert(2, str(tmp_path / "vocab"))
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    common.load_model(str(tmp_path / "ckpt"), 2, 64)
    assert "classifier head" not in capsys.readouterr().err
    reloaded, _ = common.load_model(str(tmp_path / "ckpt"), 3, 64)
    err = capsys.readouterr().err
    assert f"{tmp_path / 'ckpt'} has a 2-label classifier head and this task has 3 labels" in err
    assert reloaded.config.num_labels == 3


def test_eager_attention_only_where_head_gates_need_it(tmp_path):
    import early_bird_adv

    model, _ = offline.tiny_bert(2, str(tmp_path / "vocab"))
    model.save_pretrained(tmp_path / "ckpt")
    offline.tiny_bert_tokenizer(str(tmp_path / "ckpt"))
    plain, _ = common.load_model(str(tmp_path / "ckpt"), 2, 64)
    assert plain.config._attn_implementation != "eager"
    args = argparse.Namespace(model=str(tmp_path / "ckpt"), seed=1, max_seq_length=64, output_dir=str(tmp_path))
    assert early_bird_adv.fresh_model(args, 2).config._attn_implementation == "eager"


def test_bf16_without_cuda_warns_once(tmp_path):
    proc = cli("finetune.py", "--task", "toy", "--model", "tiny", "--bf16", "--no-cuda", "--epochs", "0.05",
               "--attacks", "none", "--max-train-examples", "64", "--max-eval-examples", "32", "--output-dir",
               str(tmp_path), "--no-save-model", env_extra={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("--bf16 needs CUDA") == 1


def test_dev_requirements_include_the_runtime_pins():
    lines = [line.strip() for line in open(os.path.join(ROOT, "requirements-dev.txt")) if line.strip()]
    assert [line for line in lines if not line.startswith("#")][0] == "-r requirements.txt"
    runtime = open(os.path.join(ROOT, "requirements.txt")).read()
    assert "tensorflow_hub==" in runtime and "transformers>=4.57,<5" in runtime


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_run_end_to_end(tmp_path):
    proc = cli("finetune.py", "--task", "toy", "--model", "tiny", "--bf16", "--epochs", "3", "--lr", "3e-3",
               "--attacks", "none", "--max-train-examples", "1500", "--max-eval-examples", "64",  # 100 % on an H200
               "--output-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "device: cuda" in proc.stdout and "--bf16 needs CUDA" not in proc.stderr
    results = json.load(open(next(tmp_path.glob("*/results.json"))))
    assert results["clean_accuracy"] > 50


# ------------------------------------------------------------------------------------------------ workers
@needs_nltk
def test_two_workers_give_the_outcomes_of_one(trained_tiny, tmp_path):
    _, data, _, model, tokenizer = trained_tiny
    attack = tiny_attack("deepwordbug", model, tokenizer)
    samples = attacks.attack_sample(data, 9, 0)
    one_summary, one = attacks.run_attack(attack, samples, data.text_columns, attack_seed=0)
    two_summary, two = attacks.run_attack(attack, samples, data.text_columns, str(tmp_path / "w.csv"), attack_seed=0,
                                          workers=2)
    assert two == one and two_summary == one_summary
    assert [int(r["index"]) for r in csv.DictReader(open(tmp_path / "w.csv"))] != []


@needs_nltk
def test_a_process_that_used_cuda_forks_cpu_workers_but_refuses_a_cuda_predictor(trained_tiny, monkeypatch, capsys):
    """On a GPU machine TextAttack (or anything) may have initialised CUDA in a CPU run: forked CPU workers are still
    fine (seen failing on an H200 before this rule); only a predictor on CUDA needs spawned workers."""
    _, data, _, model, tokenizer = trained_tiny
    parent = os.getpid()  # the forked children must not believe it too: on a GPU machine they would then use CUDA
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: os.getpid() == parent)
    attack = tiny_attack("deepwordbug", model, tokenizer)
    samples = attacks.attack_sample(data, 6, 0)
    _, one = attacks.run_attack(attack, samples, data.text_columns, attack_seed=0)
    _, two = attacks.run_attack(attack, samples, data.text_columns, attack_seed=0, workers=2)
    assert two == one and "died" not in capsys.readouterr().out
    on_cuda = attacks.build_attack("deepwordbug", attacks.callable_wrapper(
        attacks.Predictor(model, tokenizer, 64, 32, torch.device("cuda"))))
    with pytest.raises(common.UsageError, match="CUDA predictor"):
        attacks.run_attack(on_cuda, samples, data.text_columns, attack_seed=0, workers=2)


@needs_nltk
def test_a_dead_worker_loses_no_example(trained_tiny, monkeypatch, capsys):
    _, data, _, model, tokenizer = trained_tiny
    attack = tiny_attack("deepwordbug", model, tokenizer)
    samples = attacks.attack_sample(data, 6, 0)
    _, one = attacks.run_attack(attack, samples, data.text_columns)
    real_worker = attacks._attack_worker

    def dying(attack, samples, columns, indices, seed, threads, queue):
        if indices[0] == 0:  # the first worker dies (killed, out of memory) before it sends a row
            os._exit(3)
        real_worker(attack, samples, columns, indices, seed, threads, queue)

    monkeypatch.setattr(attacks, "_attack_worker", dying)
    _, two = attacks.run_attack(attack, samples, data.text_columns, workers=2)
    assert two == one
    assert "1 attack worker(s) died (exit codes [3]): attacking their 3 unfinished examples" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ shards
@needs_nltk
def test_three_shards_merge_into_the_unsharded_run(tmp_path):
    import report

    def run(out, *extra):
        args = finetune.parse_args(["--task", "toy", "--model", "tiny", "--no-cuda", "--output-dir", str(out),
                                    "--epochs", "1", "--lr", "3e-3", "--max-train-examples", "300",
                                    "--max-eval-examples", "100", "--max-seq-length", "64", "--attacks",
                                    "deepwordbug", "--attack-examples", "7", "--no-save-model", *extra])
        finetune.main(args)
        return str(next(p for p in out.iterdir() if p.is_dir()))

    whole = json.load(open(os.path.join(run(tmp_path / "whole"), "results.json")))["attacks"]["deepwordbug"]
    shards = [run(tmp_path / f"shard{i}", "--attack-shard", f"{i}/3") for i in range(3)]
    part = json.load(open(os.path.join(shards[1], "results.json")))["attacks"]["deepwordbug"]
    assert part["n"] == 2 and part["shard"] == [1, 3]  # positions 1 and 4 of the 7
    with pytest.raises(common.UsageError, match=r"incomplete shard set: have \[0, 2\] of 0..2"):
        report.merge_shards([shards[0], shards[2]], str(tmp_path / "bad"))
    other = json.load(open(os.path.join(shards[2], "results.json")))
    other["attacks"]["deepwordbug"]["predictor"] = "another-model"
    os.makedirs(tmp_path / "other")
    json.dump(other, open(tmp_path / "other" / "results.json", "w"))
    with pytest.raises(common.UsageError, match="attacked different predictors"):
        report.merge_shards(shards[:2] + [str(tmp_path / "other")], str(tmp_path / "bad"))
    merged = report.merge_shards(shards, str(tmp_path / "merged"))["attacks"]["deepwordbug"]
    assert merged["outcomes"] == whole["outcomes"] and merged["aua"] == whole["aua"] and merged["n"] == 7
    rows = list(csv.DictReader(open(tmp_path / "merged" / whole["csv"])))
    assert [r["perturbed_text"] for r in rows] == [r["perturbed_text"] for r in
                                                   csv.DictReader(open(os.path.join(run_dir_of(tmp_path / "whole"),
                                                                                    whole["csv"])))]


def run_dir_of(out):
    return str(next(p for p in out.iterdir() if p.is_dir()))


@needs_nltk
def test_attacks_cli_resumes_a_killed_attack_of_a_checkpoint(trained_tiny, tmp_path):
    _, _, _, model, tokenizer = trained_tiny
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    flags = ["--checkpoint", str(tmp_path / "ckpt"), "--task", "toy", "--no-cuda", "--max-seq-length", "64",
             "--attacks", "deepwordbug", "--attack-examples", "6", "--output-dir", str(tmp_path / "runs")]
    first = cli("attacks.py", *flags)
    assert first.returncode == 0, first.stderr[-2000:]
    run_dir = run_dir_of(tmp_path / "runs")
    whole = json.load(open(os.path.join(run_dir, "results.json")))["attacks"]["deepwordbug"]
    path = os.path.join(run_dir, whole["csv"])
    lines = open(path).read().splitlines()
    open(path, "w").write("\n".join(lines[:4]) + "\n")  # killed after three examples
    resumed = cli("attacks.py", *flags, "--resume", run_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming: 3 of 6 examples already" in resumed.stdout
    again = json.load(open(os.path.join(run_dir, "results.json")))["attacks"]["deepwordbug"]
    assert again["outcomes"] == whole["outcomes"] and len(open(path).read().splitlines()) == 7
    changed = cli("attacks.py", *flags[:-2], "--output-dir", str(tmp_path / "runs"), "--attack-seed", "3",
                  "--resume", run_dir)
    assert changed.returncode == 2 and "was run with other flags: --attack-seed" in changed.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_attacks_a_finetuned_checkpoint_on_the_gpu(tmp_path):
    model, tokenizer = offline.tiny_bert(2, str(tmp_path / "vocab"))
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    proc = cli("bench.py", "--finetuned", str(tmp_path / "ckpt"), "--task", "toy", "--attacks", "deepwordbug",
               "--attack-examples", "4", "--max-seq-length", "64", "--output-dir", str(tmp_path / "runs"))
    assert proc.returncode == 0, proc.stderr[-2000:]  # the model was on the CPU while its inputs were on CUDA


@needs_nltk
def test_a_line_cut_by_a_kill_is_attacked_again(trained_tiny, tmp_path):
    _, data, _, model, tokenizer = trained_tiny
    attack = tiny_attack("deepwordbug", model, tokenizer)
    samples = attacks.attack_sample(data, 4, 0)
    path = str(tmp_path / "a.csv")
    _, whole = attacks.run_attack(attack, samples, data.text_columns, path, key="k")
    text = open(path).read()
    open(path, "w").write(text[: len(text) - 25])  # the last row cut in the middle of its text
    assert sorted(attacks.read_attack_csv(path, "k")) == [0, 1, 2]
    _, resumed = attacks.run_attack(attack, samples, data.text_columns, path, key="k")
    assert [r["result"] for r in resumed] == [r["result"] for r in whole]
    assert sorted(attacks.read_attack_csv(path, "k")) == [0, 1, 2, 3] and len(open(path).read().splitlines()) == 5


def test_gpu_workers_go_round_robin_over_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert attacks.worker_devices(3, "cuda") == ["cuda:0", "cuda:1", "cuda:0"]
    assert attacks.worker_devices(2, "cpu") == ["cpu", "cpu"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(common.UsageError, match="no visible GPU"):
        attacks.worker_devices(2, "cuda")


def test_spawn_is_chosen_only_for_several_workers_on_cuda(toy_args, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    toy_args.attack_substitutes = None
    assert attacks.spawn_spec(lambda texts: None, "pwws", None, toy_args, "cpu", 2) is None
    assert attacks.spawn_spec(lambda texts: None, "pwws", None, toy_args, "cuda", 1) is None
    with pytest.raises(common.UsageError, match="a predictor with .to"):
        attacks.spawn_spec(lambda texts: None, "pwws", None, toy_args, "cuda", 2)
    predict = attacks.Predictor(None, None, 64, 32, "cuda")
    _, recipe, devices = attacks.spawn_spec(predict, "pwws", None, toy_args, "cuda", 2)
    assert recipe["name"] == "pwws" and devices == ["cuda:0", "cuda:1"]


@needs_nltk
def test_spawned_workers_rebuild_the_recipe_and_give_the_outcomes_of_one(trained_tiny, capsys):
    """The GPU path (spawned processes, the predictor pickled and the recipe rebuilt), run on CPU devices."""
    _, data, _, model, tokenizer = trained_tiny
    predict = attacks.Predictor(model, tokenizer, 64, 32, torch.device("cpu"), common.Autocast(False))
    attack = attacks.build_attack("deepwordbug", attacks.callable_wrapper(predict))
    samples = attacks.attack_sample(data, 6, 0)
    _, one = attacks.run_attack(attack, samples, data.text_columns, attack_seed=0)
    recipe = {"name": "deepwordbug", "query_budget": None, "max_modify_rate": None, "batch_size": 32}
    _, two = attacks.run_attack(attack, samples, data.text_columns, attack_seed=0, workers=2,
                                spawn=(predict, recipe, ["cpu", "cpu"]))
    assert two == one and "died" not in capsys.readouterr().out  # the workers did it, not the fallback


def test_checkpoint_rows_are_named_after_their_run():
    assert attacks.checkpoint_name("/x/runs/sst2__freelb__2__1700000000/model") == "freelb model (seed 2)"
    ticket = "/x/runs/sst2__robust_ticket__1__17/ticket_s0.7"
    assert attacks.checkpoint_name(ticket) == "robust_ticket ticket_s0.7 (seed 1)"
    assert attacks.checkpoint_name("/models/bert-base-uncased") == "models/bert-base-uncased"


def test_the_test_fingerprint_covers_every_row(tmp_path, toy_args):
    for name, odd in (("a", "good"), ("b", "bad")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"film {i} good\t{i % 2}\n" for i in range(40)))
        (folder / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"movie {i} {odd if i == 15 else 'ok'}\t1\n"
                                                                   for i in range(20)))
    prints = []
    for name in ("a", "b"):
        toy_args.task, toy_args.data_dir, toy_args.max_eval_examples = "sst2", str(tmp_path / name), None
        prints.append(common.load_task(toy_args).identity["test_fingerprint"])
    assert prints[0] != prints[1]  # they differ only in the 16th test sentence


@needs_nltk
def test_a_forked_attack_worker_reads_wordnet_through_its_own_file(monkeypatch):
    """Inherited WordNet files share one offset across processes: PWWS in two workers once read another's line."""
    import multiprocessing as mp

    from nltk.corpus import wordnet

    wordnet.synsets("good")  # loaded here, its data files open in the parent
    fds = [wordnet._data_file(pos).stream.fileno() for pos in ("n", "a")]
    before = [os.lseek(fd, 0, os.SEEK_CUR) for fd in fds]

    def report(attack, samples, column_names, indices, attack_seed, conn):  # the worker's loop, replaced
        for pos in ("n", "a"):  # a lookup seeks to the synset's line, reads it and seeks back to 0: stop halfway
            wordnet._data_file(pos).seek(1000)
            wordnet._data_file(pos).readline()
        conn.send(len(wordnet.synsets("dreadful")))
        return 0

    monkeypatch.setattr(attacks, "_attack_share", report)
    ctx = mp.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)
    worker = ctx.Process(target=attacks._attack_worker, args=(None, [], (), [0], 0, 1, writer))
    worker.start()
    assert reader.recv() > 0
    worker.join()
    assert [os.lseek(fd, 0, os.SEEK_CUR) for fd in fds] == before  # the child's seeks did not move the parent's files


# ------------------------------------------------------------------------------------------ rows of several predictors
def test_robustness_gain_pairs_two_predictors_on_the_same_examples():
    gain = attacks.robustness_gain({"clean": [True, False, False, False], "adversarial": [True, True, True, False]})
    assert list(gain) == ["n", "aua_clean", "aua_adversarial", "delta", "ci", "passed"]
    assert gain["n"] == 4 and gain["aua_clean"] == 25.0 and gain["aua_adversarial"] == 75.0 and gain["delta"] == 50.0
    assert gain["ci"][0] <= 50.0 <= gain["ci"][1] and gain["passed"] == (gain["ci"][0] > 0)


def test_mark_known_splits_the_mean_aua_and_skips_failed_recipes():
    row = {"attacks": {"pwws": {"aua": 10.0}, "deepwordbug": {"aua": 30.0}, "pruthi": {"error": "boom"}}}
    attacks.mark_known(row, ["pwws"])
    assert row["attacks"]["pwws"]["known"] and not row["attacks"]["pruthi"]["known"]
    assert row["aua_known_mean"] == 10.0 and row["aua_unknown_mean"] == 30.0
