# Builds the comparison report (README.md section "The comparison") from the runs' results.json files alone:
# summary.md (mean ± std over seeds) and PNG plots. `python report.py RESULTS_DIR` or `bash run_all.sh report`.
import argparse
import glob
import json
import os
from collections import defaultdict

import numpy as np

ORDER = ["finetune", "freelb", "robust_ticket", "early_bird_adv", "rosearch", "adapter_mixup"]


def load_rows(results_dir: str) -> list:
    """One row per (run, setting): the top-level result and every entry of extra.rows."""
    rows = []
    for path in sorted(glob.glob(os.path.join(results_dir, "**", "results.json"), recursive=True)):
        with open(path) as f:
            result = json.load(f)
        base = {k: result.get(k) for k in ("method", "task", "model", "seed")}
        extra_rows = (result.get("extra") or {}).get("rows") or []
        settings = {r.get("setting") for r in extra_rows}
        for r in ([result] if result.get("setting") not in settings else []) + extra_rows:
            row = {**base, **r, "method": r.get("method", base["method"]), "path": path}
            if r.get("setting") == result.get("setting"):  # the run's main row carries the run's curves
                row["extra"] = {**(r.get("extra") or {}), **{k: v for k, v in (result.get("extra") or {}).items()
                                                             if k != "rows"}}
            rows.append(row)
    return rows


def mean_std(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"


def train_seconds(row: dict) -> float:
    """Training cost: every wall-clock phase except evaluation and the total."""
    phases = row.get("wall_clock") or {}
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


def group(rows: list) -> dict:
    groups = defaultdict(list)
    for r in rows:
        groups[(r["method"], r.get("setting") or r["method"])].append(r)
    return dict(sorted(groups.items(), key=lambda kv: (ORDER.index(kv[0][0]) if kv[0][0] in ORDER else 99, kv[0][1])))


def summary_table(rows: list, failures: list) -> str:
    attacks = sorted({a for r in rows for a in (r.get("attacks") or {})})
    head = ["method", "setting", "seeds", "params", "non-emb params", "size", "train s", "Clean %"]
    for a in attacks:
        head += [f"{a} Aua %", f"{a} Suc %", f"{a} queries"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (method, setting), rs in group(rows).items():
        params = rs[0].get("params") or {}
        cells = [method, setting, str(len(rs)), count(params.get("total")), count(params.get("non_embedding")),
                 size_column(rs[0]),
                 mean_std([train_seconds(r) for r in rs]), mean_std([r.get("clean_accuracy") for r in rs])]
        for a in attacks:
            ms = [(r.get("attacks") or {}).get(a) for r in rs]
            cells += [mean_std([m["aua"] for m in ms if m]), mean_std([m["suc"] for m in ms if m]),
                      mean_std([m["queries"] for m in ms if m])]
        lines.append("| " + " | ".join(cells) + " |")
    for fail in failures:
        lines.append(f"| {fail['method']} | FAILED (seed {fail['seed']}) | {fail['reason']} |" + " |" * (len(head) - 3))
    return "\n".join(lines)


def plot_clean_vs_aua(rows, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = sorted({a for r in rows for a in (r.get("attacks") or {})})
    if not attacks:
        return []
    fig, axes = plt.subplots(1, len(attacks), figsize=(6 * len(attacks), 5), squeeze=False)
    groups = group(rows)
    costs = [np.mean([train_seconds(r) for r in rs]) for rs in groups.values()]
    scale = 600.0 / max(max(costs), 1e-9)
    methods = list(dict.fromkeys(m for m, _ in groups))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    for ax, attack in zip(axes[0], attacks):
        for ((method, setting), rs), cost in zip(groups.items(), costs):
            aua = [r["attacks"][attack]["aua"] for r in rs if attack in (r.get("attacks") or {})]
            if not aua:
                continue
            clean = np.mean([r["clean_accuracy"] for r in rs])
            ax.scatter(clean, np.mean(aua), s=30 + scale * cost, alpha=0.55, color=colours[method],
                       label=method if method not in ax.get_legend_handles_labels()[1] else None)
            ax.annotate(setting, (clean, np.mean(aua)), fontsize=6, alpha=0.8, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel("clean accuracy %")
        ax.set_ylabel(f"accuracy under {attack} %")
        ax.set_title(f"{attack} (marker area ~ training seconds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, markerscale=0.4, loc="best")
    fig.tight_layout()
    path = os.path.join(out_dir, "clean_vs_aua.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def finish_plot(fig, ax, path, xlabel, ylabel, title):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_curves(rows, out_dir):
    """The method-specific curves: robust-ticket sparsity sweep, AdpMixup beta curve, early-bird mask distance."""
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
    curves = [(r, (r.get("extra") or {}).get("beta_curve")) for r in rows if r["method"] == "adapter_mixup"]
    curves = [(r, c["points"] if isinstance(c, dict) else c) for r, c in curves if c]
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for r, curve in curves:
            betas = [p["beta"] for p in curve]
            for key in [k for k in curve[0] if k != "beta"]:
                ax.plot(betas, [p[key] for p in curve], marker=".", label=f"{key} (seed {r['seed']})")
        made.append(finish_plot(fig, ax, os.path.join(out_dir, "adapter_mixup_beta.png"),
                                "beta (weight of the clean adapter: 1 = clean adapter alone)", "accuracy %",
                                "AdpMixup: beta trade-off"))
        plt.close(fig)
    tickets = [r for r in rows if r["method"] == "early_bird_adv" and (r.get("extra") or {}).get("window_distances")]
    if tickets:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for i, r in enumerate(tickets):
            extra = r["extra"]
            epochs = [w["epoch"] for w in extra["window_distances"]]
            for key, style in (("d_head", "-"), ("d_ffn", "--")):
                ax.plot(epochs, [max(w[key]) for w in extra["window_distances"]], style, marker=".",
                        color=plt.get_cmap("tab10")(i), label=f"{key[2:]} (seed {r['seed']})")
            if extra.get("draw_epoch") is not None:
                ax.axvline(extra["draw_epoch"], ls=":", color=plt.get_cmap("tab10")(i))
        made.append(finish_plot(fig, ax, os.path.join(out_dir, "early_bird_distance.png"), "search epoch (checkpoint)",
                                "max Hamming distance to the next checkpoints",
                                "Early-bird: mask distance (dotted: draw point)"))
        plt.close(fig)
    return made


BENCH_PATTERNS = [  # (log file, label, regex whose groups are the figure, unit appended, target from the issues)
    ("wrapper.log", "attack wrapper: TextAttack stock / ours (time, same outcomes)",
     r"^\S+\s+[\d.]+\s+[\d.]+\s+([\d.]+x\s+\d+/\d+)", "", ">= 3x, identical outcomes"),
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
    ("adapter_mixup.log", "AdpMixup: projected training AdpMixup vs full AT (s)",
     r"AdpMixup (\d+s) .* vs full AT (\d+s)", "", ""),
]


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
    for path in sorted(glob.glob(os.path.join(results_dir, "failed", "*.txt"))):
        method, _, seed = os.path.basename(path)[:-4].rpartition("__")
        with open(path) as f:
            failures.append({"method": method, "seed": seed, "reason": f.read().strip().replace("|", "/")[:200]})
    return failures


def main():
    parser = argparse.ArgumentParser(description="Rebuild summary.md and plots from the results.json files of a "
                                     "run_all.sh output folder (no training).")
    parser.add_argument("results_dir", help="folder written by run_all.sh (results.json files anywhere below it)")
    parser.add_argument("--title", default=None, help="heading of summary.md (e.g. the scale it was run at)")
    parser.add_argument("--bench-table", action="store_true", help="print the table of `run_all.sh --bench` logs "
                        "in RESULTS_DIR instead")
    args = parser.parse_args()
    if args.bench_table:
        print(bench_table(args.results_dir))
        return
    rows = load_rows(args.results_dir)
    failures = read_failures(args.results_dir)
    if not rows and not failures:
        raise SystemExit(f"error: no results.json under {args.results_dir}; run `bash run_all.sh` first")
    plots = plot_clean_vs_aua(rows, args.results_dir) + plot_curves(rows, args.results_dir)
    scale = sorted({f"{r['task']} / {os.path.basename(str(r['model']).rstrip('/'))}" for r in rows})
    text = [f"# {args.title or 'Comparison'}", "", f"Task / model: {', '.join(scale)}. "
            f"Mean ± sample std over seeds; accuracies in %, training wall-clock in seconds.", "",
            summary_table(rows, failures), ""]
    text += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    path = os.path.join(args.results_dir, "summary.md")
    with open(path, "w") as f:
        f.write("\n".join(text) + "\n")
    print("\n".join(text[:5 + len(rows) + 2]))
    print(f"\nwrote {path} and {len(plots)} plot(s)")


if __name__ == "__main__":
    main()
