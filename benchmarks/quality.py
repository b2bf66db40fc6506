"""Quality sweep: how much of each expert's accuracy survives merging, per method, as the number of merged
tasks k grows. Builds (or reuses) the built-in task suite (or takes any TaskSuite: --suite MODULE:FUNCTION),
merges sampled subsets of k tasks for k=2..8
(the same subsets for every method), evaluates exact-match accuracy by greedy decoding, and writes

  benchmarks/out/quality.csv   one row per (method, subset): accuracies, normalised accuracies, ANP, time
  benchmarks/out/quality.md    ANP per method (rows) and k (columns), mean over the subsets
  benchmarks/out/quality.png   ANP against k per method

Usage: python benchmarks/quality.py [--ks 2,3,4,5,6,7,8] [--subsets 3] [--steps 60] [--cache DIR] [--oracle]
       [--variant small] [--seed N]
(--oracle adds task_oracle: per-task coefficients searched on the validation split, an upper reference)
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from blockmerge.suite.demo import DEFAULT_METHODS, Comparison, Settings, load_suite, quiet_transformers
from blockmerge.suite.evaluate import load_model, task_subsets

OUT = Path(__file__).resolve().parent / "out"


def write_outputs(rows: list[dict], out: Path, methods: list[str], ks: list[int], header: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fields = ["method", "k", "subset", "anp", "seconds", "lambda", "val_anp", "loss_first", "loss_last", "coef_mean"]
    with open(out / "quality.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields + ["acc", "norm", "coefficients"])
        for r in rows:
            coef = json.dumps([[round(c, 4) for c in row] for row in r["coefficients"]]) if "coefficients" in r else ""
            w.writerow([r.get(k, "") for k in fields] + [json.dumps(r["acc"]), json.dumps(r["norm"]), coef])
    table = {m: {} for m in methods}
    for m in methods:
        for k in ks:
            vals = [r["anp"] for r in rows if r["method"] == m and r["k"] == k]
            if vals:
                table[m][k] = sum(vals) / len(vals)
    n = {k: len({r["subset"] for r in rows if r["k"] == k}) for k in ks}
    cols = " | ".join(f"k={k} (n={n[k]})" for k in ks)
    lines = [header, "", f"| method | {cols} | mean |", "|---|" + "---:|" * (len(ks) + 1)]
    merged = [m for m in methods if m != "base"]
    best = {k: max((table[m][k] for m in merged if k in table[m]), default=None) for k in ks}
    for m in methods:
        cells = []
        for k in ks:
            v = table[m].get(k)
            cells.append("" if v is None else (f"**{v:.3f}**" if v == best[k] and m != "base" else f"{v:.3f}"))
        vals = list(table[m].values())
        mean = f"{sum(vals) / len(vals):.3f}" if vals else ""
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {mean} |")
    (out / "quality.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        xs = [k for k in ks if k in table[m]]
        style = "-" if m.startswith("divmerge") else ("--" if m.startswith("adamerging") else ":")
        color = "black" if m == "base" else plt.cm.tab10(methods.index(m) % 10)
        kw = {"linestyle": "-." if m == "base" else style, "marker": "x" if m == "base" else "o", "color": color}
        ax.plot(xs, [table[m][k] for k in xs], label=m, linewidth=2 if "js_layer" in m else 1.2, **kw)
    ax.set_xlabel("number of merged tasks k")
    ax.set_ylabel("ANP (merged / expert accuracy, mean over tasks)")
    ax.set_title("blockmerge quality suite")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ks", default="2,3,4,5,6,7,8")
    p.add_argument("--subsets", type=int, default=3, help="sampled subsets per k (all when fewer exist)")
    p.add_argument("--steps", type=int, default=None, help="learning steps of DivMerge/AdaMerging")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--oracle", action="store_true", help="add task_oracle (slow)")
    p.add_argument("--suite", default=None, help="MODULE:FUNCTION returning a TaskSuite (default: built-in)")
    p.add_argument("--variant", default="default", help="built-in suite: default or small (the CI test's)")
    p.add_argument("--cache", default=None)
    p.add_argument("--seed", type=int, default=0, help="built-in suite's seed, subsets and DARE seed")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    started = time.perf_counter()
    quiet_transformers()
    suite = load_suite(args.suite, args.cache, args.seed, variant=args.variant)
    ks = [int(k) for k in args.ks.split(",")]
    methods = [m for m in args.methods.split(",") if m] + (["task_oracle"] if args.oracle else [])
    settings = Settings(seed=args.seed)
    if args.steps is not None:
        settings.learn_steps = args.steps
    cmp = Comparison(suite, settings)
    rows: list[dict] = []
    base = load_model(suite.base)
    header = (
        f"ANP (mean over the n sampled subsets of k tasks; the same subsets for every method) on {suite.name} "
        f"({', '.join(suite.tasks)}); experts' test accuracy "
        + ", ".join(f"{t} {cmp.expert_accuracy(t):.2f}" for t in suite.tasks)
        + "; base "
        + ", ".join(f"{t} {cmp.accuracy(base, t):.2f}" for t in suite.tasks)
        + f". Learned methods: {settings.learn_steps} steps, batch {settings.learn_batch}, "
        f"{settings.n_unlabeled} unlabeled prompts per task. "
        f"Command: `python benchmarks/quality.py --ks {args.ks} --subsets {args.subsets}"
        + (f" --steps {args.steps}" if args.steps is not None else "")
        + (" --oracle" if args.oracle else "")
        + (f" --variant {args.variant}" if args.variant != "default" else "")
        + (f" --seed {args.seed}" if args.seed else "")
        + "`"
    )
    out = Path(args.out)
    subsets = {k: task_subsets(list(suite.tasks), k, args.subsets, args.seed) for k in ks}
    # round robin over k (first subset of every k, then the second, ...), so that a sweep stopped early
    # still covers every k; outputs are rewritten after each subset
    for rep in range(max(len(v) for v in subsets.values())):
        for k in ks:
            if rep >= len(subsets[k]):
                continue
            subset = subsets[k][rep]
            print(f"k={k}: {', '.join(subset)}  ({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)
            rows += cmp.run(subset, methods)
            write_outputs(rows, out, methods, ks, header)
    write_outputs(rows, out, methods, ks, header)
    print((out / "quality.md").read_text())
    print(f"sweep done in {time.perf_counter() - started:.0f}s; wrote {out}/quality.csv, quality.md, quality.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
