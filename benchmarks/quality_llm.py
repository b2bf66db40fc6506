"""DivMerge's experiment on a real pretrained LLM (SmolLM2-135M-Instruct, from its GGUF file): six templated
tasks (blockmerge.suite.llm), one fully fine-tuned expert and one LoRA adapter per task, and every merging
method on the same subsets of k tasks, all through blockmerge's APIs. Writes

  benchmarks/results/quality_llm.csv          one row per (method, subset), appended as each merge finishes
  benchmarks/results/quality_llm.md           ANP per method and k (mean over subsets), the paper's beside
  benchmarks/results/quality_llm.png          ANP against k
  benchmarks/results/quality_llm_models.json  base/expert/adapter accuracies, task-vector sizes and cosines

Work is done by priority: import base -> experts (>= --target test accuracy, else a loud failure naming the
task) -> accuracies and task vectors -> k=2 pairs (all methods) -> k=6 -> k=4 -> LoRA adapters + DivMerge
over them at k=4. With --time-limit the run stops before a stage it has no time for and still writes
what it has. Every stage is cached under --cache (base, experts, adapters, teacher passes, merge results):
rerunning resumes.

  python benchmarks/quality_llm.py --device cuda --gguf SmolLM2-135M-Instruct.Q4_1.gguf --cache DIR
  python benchmarks/quality_llm.py --gguf ... --cache DIR            # CPU: shrunk sizes (see --help)
  python benchmarks/quality_llm.py --smoke --cache DIR --out DIR     # tiny random model, seconds
  python benchmarks/quality_llm.py --report-only                     # tables and plot from the CSV
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from blockmerge.suite import llm as ls
from blockmerge.suite import llm_diagnose, llm_train
from blockmerge.suite.demo import Settings, quiet_transformers, static_config
from blockmerge.suite.evaluate import anp, normalized, task_subsets

OUT = Path(__file__).resolve().parent / "results"
METHODS = ["average", "task_arithmetic", "ties", "dare_ties", "adamerging_task", "adamerging_layer",
           "divmerge_js_task", "divmerge_js_layer"]  # fmt: skip
# run order within a subset when time is short: the cheap static merges, then DivMerge, then AdaMerging
RUN_ORDER = ["average", "task_arithmetic", "ties", "dare_ties", "divmerge_js_layer", "divmerge_js_task",
             "adamerging_task", "adamerging_layer"]  # fmt: skip
LEARNED = {
    "adamerging_task": ("entropy", "task"),
    "adamerging_layer": ("entropy", "layer"),
    "divmerge_js_task": ("js", "task"),
    "divmerge_js_layer": ("js", "layer"),
}
LORA_METHOD = "lora_divmerge_js_layer"
# Qwen2.5-0.5B, 7 GLUE tasks (arXiv 2509.02108): ANP pairwise (k=2) and at k=7
PAPER = {"divmerge_js_layer": (0.9918, 0.9306), "ties": (0.9406, 0.6839)}
FIELDS = ["method", "k", "subset", "anp", "seconds", "lambda", "val_anp", "steps", "loss_first", "loss_last",
          "coef_mean", "sec_per_step", "acc", "norm", "coef_task"]  # fmt: skip
JSON_FIELDS = ("acc", "norm", "coef_task")

# sizes per mode: prompts per task (task / layer level), epochs, test/val pairs, subsets per k, fine-tuning
PROFILES = {
    "cuda": dict(n_task=200, n_layer=400, epochs=4.0, n_test=200, n_val=100, subsets="2:3,6:1,4:2",
                 ft_batch=32, ft_max_steps=800, ft_check=20, eval_batch=512),
    "cpu": dict(n_task=24, n_layer=48, epochs=2.0, n_test=60, n_val=40, subsets="2:3,6:1,4:1",
                ft_batch=16, ft_max_steps=300, ft_check=10, eval_batch=64),
    "smoke": dict(n_task=4, n_layer=4, epochs=1.0, n_test=8, n_val=6, subsets="2:1",
                  ft_batch=4, ft_max_steps=2, ft_check=1, eval_batch=16),
}  # fmt: skip
SMOKE_TASKS = "sentiment,topic,largest"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gguf", default=None, help="the SmolLM2-135M-Instruct .gguf file (imported once into --cache)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda: the paper's full settings)")
    p.add_argument("--cache", default=None, help="cache folder (default $BLOCKMERGE_CACHE/quality_llm)")
    p.add_argument("--out", default=str(OUT), help="results folder (default benchmarks/results)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds for the whole run; stops cleanly")
    p.add_argument("--smoke", action="store_true", help="tiny random model, 3 tasks, k=2, a few steps")
    p.add_argument(
        "--smoke-shape", default="tiny", choices=list(llm_train.TINY_SHAPES), help="smoke base: tiny or 135m"
    )
    p.add_argument("--report-only", action="store_true", help="only rewrite the table and plot from the CSV")
    p.add_argument("--tasks", default=None, help=f"comma-separated tasks (default all: {','.join(ls.TASKS)})")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--subsets", default=None, help="k:n,... subsets per k in priority order (cuda: 2:3,6:1,4:2)")
    p.add_argument(
        "--kernels",
        default="torch",
        choices=["torch", "auto"],
        help="blockmerge kernels: torch (the reference formulas, any device; default) or auto (Triton on GPU)",
    )
    p.add_argument(
        "--on-miss",
        default="fail",
        choices=["fail", "drop"],
        help="an expert below --target: fail (default) or drop its task, loudly, and go on",
    )
    p.add_argument("--no-diagnose", action="store_true", help="skip the study of the first pair's learned merges")
    p.add_argument("--no-lora", action="store_true", help="skip the LoRA adapters and their DivMerge")
    p.add_argument("--lora-k", type=int, default=4, help="tasks merged by DivMerge over LoRA adapters")
    g = p.add_argument_group("sizes (defaults: cuda = the paper's, cpu = shrunk to ~2 h on 2 cores)")
    g.add_argument("--prompts-task", type=int, default=None, help="unlabeled prompts per task, task level")
    g.add_argument("--prompts-layer", type=int, default=None, help="unlabeled prompts per task, layer level")
    g.add_argument("--epochs", type=float, default=None, help="epochs of the learned merges (paper: 4)")
    g.add_argument("--batch-per-task", type=int, default=4, help="learning batch = this x k (paper: 4)")
    g.add_argument("--lr", type=float, default=1e-2, help="Adam lr of the learned merges (paper: 1e-2)")
    g.add_argument("--new-tokens", type=int, default=None, help="teacher continuation length (default: answer+EOS)")
    g.add_argument("--seq-len", type=int, default=64, help="longest prompt in tokens")
    g.add_argument("--n-test", type=int, default=None)
    g.add_argument("--n-val", type=int, default=None)
    g.add_argument("--ft-lr", type=float, default=5e-5, help="experts' Adam lr (full fine-tuning)")
    g.add_argument("--ft-batch", type=int, default=None)
    g.add_argument("--ft-max-steps", type=int, default=None, help="bound of each expert's training")
    g.add_argument("--ft-check", type=int, default=None, help="steps between accuracy checks (cuda 20, cpu 10)")
    g.add_argument("--target", type=float, default=None, help="test accuracy every expert must reach (0.95)")
    g.add_argument("--lora-rank", type=int, default=8)
    g.add_argument("--lora-lr", type=float, default=1e-3)
    g.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    prof = PROFILES["smoke" if args.smoke else ("cuda" if args.device.startswith("cuda") else "cpu")]
    for key, attr in [("n_task", "prompts_task"), ("n_layer", "prompts_layer"), ("epochs", "epochs"),
                      ("n_test", "n_test"), ("n_val", "n_val"), ("subsets", "subsets"), ("ft_batch", "ft_batch"),
                      ("ft_max_steps", "ft_max_steps")]:  # fmt: skip
        if getattr(args, attr) is None:
            setattr(args, attr, prof[key])
    args.ft_check = args.ft_check or prof["ft_check"]
    args.eval_batch = prof["eval_batch"]
    if args.smoke:
        args.tasks = args.tasks or SMOKE_TASKS
        args.lora_k = 2
    if args.target is None:
        args.target = 0.0 if args.smoke else 0.95
    args.tasks = [t for t in (args.tasks or ",".join(ls.TASKS)).split(",") if t]
    args.methods = [m for m in args.methods.split(",") if m]
    for m in args.methods:
        if m not in METHODS:
            p.error(f"--methods: unknown method {m!r}; known: {', '.join(METHODS)}")
    try:
        args.plan = [(int(k), int(n)) for k, n in (x.split(":") for x in args.subsets.split(",") if x)]
    except ValueError:
        p.error(f"--subsets {args.subsets!r}: expected k:n,... e.g. 2:3,6:1,4:2")
    for k, _ in args.plan:
        if not 2 <= k <= len(args.tasks):
            p.error(f"--subsets: k={k} needs 2..{len(args.tasks)} tasks")
    if not args.smoke and not args.report_only and not args.gguf:
        p.error("--gguf is required (or --smoke, or --report-only)")
    cache = args.cache or os.path.join(os.environ.get("BLOCKMERGE_CACHE", "~/.cache/blockmerge"), "quality_llm")
    args.cache = Path(cache).expanduser() / (f"smoke-{args.smoke_shape}" if args.smoke else "")
    args.out = Path(args.out)
    return args


class Clock:
    """The run's deadline; `fits(seconds)` says whether a stage of that estimated length still fits."""

    def __init__(self, limit: float | None):
        self.start, self.limit = time.perf_counter(), limit

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fits(self, seconds: float) -> bool:
        return self.limit is None or self.elapsed() + seconds <= self.limit


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def learn_steps(args, level: str) -> int:
    """Learning steps of one learned merge: epochs x (n prompts x k) / (batch per task x k), k cancels."""
    n = args.prompts_task if level == "task" else args.prompts_layer
    return max(1, math.ceil(args.epochs * n / args.batch_per_task))


def print_plan(args, subsets) -> None:
    learned = [m for m in args.methods if m in LEARNED]
    per = {m: learn_steps(args, LEARNED[m][1]) for m in learned}
    total = sum(per.values()) * sum(len(v) for v in subsets.values())
    lora = 0 if args.no_lora else learn_steps(args, "layer")
    log(f"plan: tasks {', '.join(args.tasks)}; subsets {', '.join(f'k={k}: {len(v)}' for k, v in subsets.items())}")
    log("learning steps per merge: " + ", ".join(f"{m} {s}" for m, s in per.items())
        + f" (epochs {args.epochs}, batch {args.batch_per_task} x k, prompts/task {args.prompts_task} task level,"
        f" {args.prompts_layer} layer level); total {total + lora} steps incl. LoRA DivMerge {lora};"
        f" experts: at most {args.ft_max_steps} fine-tuning steps each (batch {args.ft_batch})")  # fmt: skip


# ---- stage: the base --------------------------------------------------------------------------------------


def import_base(gguf: Path, out: Path) -> Path:
    """The GGUF file as an fp32 safetensors checkpoint (cached)."""
    if (out / "config.json").exists():
        return out
    if not gguf.is_file():
        raise FileNotFoundError(f"--gguf {gguf}: file not found")
    from blockmerge.io.gguf import import_gguf

    return import_gguf(gguf, out, dtype="float32")  # fp32: task vectors are below bf16's resolution


# ---- stage: merges -----------------------------------------------------------------------------------------


def settings_key(args) -> str:
    """Merge results are cached per these settings (changing one recomputes the merges, not the experts)."""
    keep = ["tasks", "prompts_task", "prompts_layer", "epochs", "batch_per_task", "lr", "new_tokens", "n_test", "n_val",
            "seq_len", "ft_lr", "target", "seed", "lora_rank", "lora_lr", "smoke"]  # fmt: skip
    return hashlib.sha256(json.dumps({k: getattr(args, k) for k in keep}).encode()).hexdigest()[:12]


class Merger:
    """Runs one method on one subset, evaluates it on the test split, returns the CSV row."""

    def __init__(self, args, suite: ls.LlmSuite, expert_test: dict, adapter_test: dict, clock: Clock):
        self.args, self.suite, self.clock = args, suite, clock
        self.expert_test, self.adapter_test = expert_test, adapter_test
        self.expert_val: dict[str, float] = {}
        self.s = Settings(seed=args.seed)
        self.tmp = args.cache / "tmp"
        self.sec_per_step = 0.5 if args.device.startswith("cuda") else 5.0  # prior, updated as steps are timed

    def estimate(self, method: str, k: int) -> float:
        if method in LEARNED or method == LORA_METHOD:
            level = "layer" if method == LORA_METHOD else LEARNED[method][1]
            return learn_steps(self.args, level) * self.sec_per_step * (k / 2) ** 0.5 + 20
        return 60 if method == "task_arithmetic" else 15

    def evaluate(self, path: Path, subset, split: str = "test") -> dict[str, float]:
        return ls.accuracies(path, self.suite, subset, split, self.args.device, self.args.eval_batch)

    def inputs(self, subset, level: str) -> list[list[list[int]]]:
        n = self.args.prompts_task if level == "task" else self.args.prompts_layer
        return [[self.suite.encode_prompt(p) for p in self.suite.unlabeled(t, n)] for t in subset]

    def learn_kwargs(self, subset, level: str, objective: str) -> dict:
        a = self.args
        new = a.new_tokens or max(self.suite.max_new_tokens(t) for t in subset)
        return dict(level=level, objective=objective, epochs=a.epochs, steps=None, lr=a.lr,
                    batch_size=a.batch_per_task * len(subset), max_new_tokens=new,
                    eos_token_id=self.suite.eos_token_id, seed=a.seed, device=a.device,
                    cache_dir=a.cache / "teacher", progress=True)  # fmt: skip

    def run(self, method: str, subset: tuple[str, ...]) -> dict:
        started = time.perf_counter()
        out = self.tmp / method
        shutil.rmtree(out, ignore_errors=True)
        info: dict = {}
        normaliser = self.expert_test
        if method == "task_arithmetic":
            info = self.tune_lambda(subset, out)
        elif method in LEARNED:
            info = self.learned(method, subset, out)
        elif method == LORA_METHOD:
            info = self.lora(subset, out)
            normaliser = self.adapter_test
        else:
            self._static(method, subset, out)
        acc = self.evaluate(out, subset)
        shutil.rmtree(out, ignore_errors=True)
        if info.get("steps"):  # the whole merge per step (teacher pass and evaluation included): conservative
            self.sec_per_step = (time.perf_counter() - started) / info["steps"]
        norm = normalized(acc, {t: normaliser[t] for t in subset})
        return {"method": method, "k": len(subset), "subset": "+".join(subset), "anp": sum(norm.values()) / len(norm),
                "seconds": time.perf_counter() - started, "acc": acc, "norm": norm, **info}  # fmt: skip

    def _static(self, method, subset, out, lam: float = 1.0) -> Path:
        from blockmerge.merge.run import run_merge

        cfg = static_config(method, self.suite, subset, self.s, lam)
        return run_merge(cfg, out, force=True, progress=False, device=self.args.device)

    def tune_lambda(self, subset, out) -> dict:
        for t in subset:
            if t not in self.expert_val:
                self.expert_val[t] = self.evaluate(self.suite.expert(t), [t], "val")[t]
        best = None
        for lam in self.s.ta_lambdas:
            self._static("task_arithmetic", subset, out, lam)
            score = anp(self.evaluate(out, subset, "val"), {t: self.expert_val[t] for t in subset})
            if best is None or score > best[1]:
                best = (lam, score)
        self._static("task_arithmetic", subset, out, best[0])
        return {"lambda": best[0], "val_anp": best[1]}

    def _record(self, method, subset, res) -> dict:
        path = learned_path(self.args, method, subset)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = res.to_json()
        path.write_text(json.dumps(record))
        tail = res.losses[-10:]
        return {"steps": len(res.losses), "loss_first": res.losses[0], "loss_last": sum(tail) / len(tail),
                "coef_mean": float(res.coefficients.mean()), "sec_per_step": res.seconds_per_step,
                "coef_task": task_coefficients(record, subset)}  # fmt: skip

    def learned(self, method, subset, out) -> dict:
        from blockmerge.learn.full import learn, write_merged

        objective, level = LEARNED[method]
        experts = [self.suite.expert(t) for t in subset]
        res = learn(self.suite.base, experts, self.inputs(subset, level), **self.learn_kwargs(subset, level, objective))
        write_merged(self.suite.base, experts, res.coefficients, out, force=True, progress=False,
                     device=self.args.device)  # fmt: skip
        return self._record(method, subset, res)

    def lora(self, subset, out) -> dict:
        from blockmerge.lora import learn as lora_learn

        adapters = [self.suite.adapter(t) for t in subset]
        res = lora_learn.learn(self.suite.base, adapters, self.inputs(subset, "layer"),
                               **self.learn_kwargs(subset, "layer", "js"))  # fmt: skip
        lora_learn.write_learned(self.suite.base, adapters, res.coefficients, out, force=True, progress=False,
                                 device=self.args.device)  # fmt: skip
        return self._record(LORA_METHOD, subset, res)


# ---- outputs ----------------------------------------------------------------------------------------------


def learned_path(args, method: str, subset) -> Path:
    """The learned coefficients and loss curve of one learned merge, under the settings that made them."""
    return args.cache / "learned" / settings_key(args) / f"{method}-{'+'.join(subset)}.json"


def task_coefficients(record: dict, subset) -> dict[str, float]:
    """Per task, the mean over blocks of a learned record's coefficients ([{block: value}] per task)."""
    return {t: round(sum(c.values()) / len(c), 4) for t, c in zip(subset, record["coefficients"], strict=True)}


def append_row(path: Path, row: dict) -> None:
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(FIELDS)
        w.writerow([json.dumps(row[k]) if k in JSON_FIELDS and k in row else row.get(k, "") for k in FIELDS])


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["k"], r["anp"] = int(r["k"]), float(r["anp"])
        for k in JSON_FIELDS:
            r[k] = json.loads(r[k]) if r.get(k) else None
    return rows


def cell(value: float | None, count: int | None, n: int) -> str:
    """An ANP cell: empty if the method did not run, its own subset count if it ran on fewer than the column's."""
    if value is None:
        return ""
    return f"{value:.3f}" + ("" if count == n else f" (n={count})")


def write_report(out: Path) -> None:
    """quality_llm.md and quality_llm.png from quality_llm.csv (and quality_llm_models.json when present)."""
    rows = read_rows(out / "quality_llm.csv")
    models_file = out / "quality_llm_models.json"
    models = json.loads(models_file.read_text()) if models_file.exists() else {}
    methods = [m for m in ["base", *METHODS, LORA_METHOD] if any(r["method"] == m for r in rows)]
    ks = sorted({r["k"] for r in rows})
    table = {m: {} for m in methods}
    counts = {m: {} for m in methods}  # subsets a method ran on: fewer than its column's n when a run was cut short
    for m in methods:
        for k in ks:
            vals = [r["anp"] for r in rows if r["method"] == m and r["k"] == k]
            if vals:
                table[m][k], counts[m][k] = sum(vals) / len(vals), len(vals)
    n = {k: len({r["subset"] for r in rows if r["k"] == k}) for k in ks}
    lines = ["# Merging quality on SmolLM2-135M-Instruct (benchmarks/quality_llm.py)", ""]
    if models:
        lines += [f"Command: `{models.get('command', '')}`", "", models.get("settings", ""), ""]
        lines += ["| task | base | expert | LoRA adapter | expert steps | ‖τ‖/‖θ0‖ | weights changed |",
                  "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        st = models.get("task_vectors", {})
        for t, b in models.get("base_test", {}).items():
            e, a = models.get("expert_test", {}).get(t), models.get("adapter_test", {}).get(t)
            rel, frac = st.get("relative_norm", {}).get(t), st.get("fraction_changed", {}).get(t)
            lines.append(f"| {t} | {b:.3f} | " + (f"{e:.3f}" if e is not None else "") + " | "
                         + (f"{a:.3f}" if a is not None else "") + f" | {models.get('expert_steps', {}).get(t, '')} | "
                         + (f"{100 * rel:.3f}%" if rel is not None else "") + " | "
                         + (f"{100 * frac:.1f}%" if frac is not None else "") + " |")  # fmt: skip
        cos = st.get("cosine", {})
        if cos:
            names = list(cos)
            lines += ["", "Cosines between task vectors:", "", "| | " + " | ".join(names) + " |",
                      "|---|" + "---:|" * len(names)]  # fmt: skip
            lines += [f"| {a} | " + " | ".join(f"{cos[a][b]:.3f}" for b in names) + " |" for a in names]
        lines.append("")
    cols = " | ".join(f"k={k} (n={n[k]})" for k in ks)
    lines += ["ANP (mean over the n subsets of k tasks, the same subsets for every method; a cell marked (n=..)"
              " covers only that many of them, the first ones in the run's order; an empty cell did not run; LoRA: "
              "normalised by the adapters' accuracy). Paper: Qwen2.5-0.5B, 7 GLUE tasks, k=2 / k=7.", "",
              f"| method | {cols} | paper k=2 | paper k=7 |", "|---|" + "---:|" * (len(ks) + 2)]  # fmt: skip
    for m in methods:
        cells = " | ".join(cell(table[m].get(k), counts[m].get(k), n[k]) for k in ks)
        paper = PAPER.get(m)
        lines.append(f"| {m} | {cells} | " + (f"{paper[0]:.4f} | {paper[1]:.4f}" if paper else " | ") + " |")
    lines += coefficient_lines(rows)
    diag = out / "quality_llm_diagnosis.json"
    if diag.exists():
        lines += diagnosis_lines(json.loads(diag.read_text()))
    (out / "quality_llm.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, m in enumerate(methods):
        xs = sorted(table[m])
        style = "-" if "divmerge" in m else ("--" if m.startswith("adamerging") else ":")
        ax.plot(xs, [table[m][k] for k in xs], style, marker="o", label=m, color=plt.cm.tab10(i % 10),
                linewidth=2 if m == "divmerge_js_layer" else 1.2)  # fmt: skip
    ax.set_xlabel("number of merged tasks k")
    ax.set_ylabel("ANP (merged / expert accuracy)")
    ax.set_title("SmolLM2-135M-Instruct: merging quality")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "quality_llm.png", dpi=120)
    plt.close(fig)


# ---- the job ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        write_report(args.out)
        print((args.out / "quality_llm.md").read_text())
        return 0
    clock = Clock(args.time_limit)
    os.environ.setdefault("BLOCKMERGE_KERNELS", args.kernels)
    quiet_transformers()
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # task vectors are ~1e-3 of the weights: keep fp32 exact
    torch.manual_seed(args.seed)
    args.cache.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/quality_llm.py " + " ".join(sys.argv[1:] if argv is None else argv)

    # 1. the base
    if args.smoke:
        base = llm_train.build_tiny_base(args.cache / "base", args.tasks, args.seed, args.smoke_shape)
    else:
        base = import_base(Path(args.gguf), args.cache / "base")
    sizes = ls.SuiteSizes(n_test=args.n_test, n_val=args.n_val, seed=args.seed, max_prompt_tokens=args.seq_len)
    suite = ls.LlmSuite(base, args.cache, args.tasks, sizes, name="smollm2-135m")
    print_plan(args, {k: task_subsets(list(args.tasks), k, n, args.seed) for k, n in args.plan})

    # 2. experts: full fine-tunes that must reach the target test accuracy
    ft = llm_train.FinetuneSettings(lr=args.ft_lr, batch_size=args.ft_batch, max_steps=args.ft_max_steps,
                             check_every=args.ft_check, target=args.target, seed=args.seed,
                             eval_batch=args.eval_batch)  # fmt: skip
    expert_info, dropped = {}, {}
    for t in args.tasks:
        if not clock.fits(30) and not suite.expert(t).exists():
            log(f"time limit: stopping before expert {t}")
            return finish(args, {}, clock)
        try:
            expert_info[t] = llm_train.train_expert(suite, t, ft, args.device, log)
        except llm_train.TargetNotReached as e:
            if args.on_miss == "fail":
                raise
            log(f"DROPPED TASK {t}: {e}")
            dropped[t] = str(e)
    args.tasks = [t for t in args.tasks if t not in dropped]
    suite.tasks = tuple(args.tasks)
    subsets = {k: task_subsets(list(args.tasks), k, n, args.seed) for k, n in args.plan if k <= len(args.tasks)}

    # 3. accuracies and task vectors (cached)
    models = cached_json(args.cache / f"models-{settings_key(args)}.json", lambda: model_stats(args, suite))
    models["expert_steps"] = {t: i["steps"] for t, i in expert_info.items()}
    models["dropped"] = dropped
    models.update(command=command, settings=settings_line(args))
    write_models(args, models)

    # 4. merges, by priority: k=2 pairs, then k=6, then k=4, then LoRA at k=4
    csv_path = args.out / "quality_llm.csv"
    done = restore_rows(args, csv_path)
    merger = Merger(args, suite, models["expert_test"], models.get("adapter_test", {}), clock)
    for k in subsets:
        for subset in subsets[k]:
            log(f"k={k}: {', '.join(subset)}  ({clock.elapsed():.0f}s)")
            add_base_row(args, models, subset, done, csv_path)
            for m in sorted(args.methods, key=RUN_ORDER.index):
                run_one(args, merger, m, subset, done, csv_path, clock)
        if k == 2 and not args.no_diagnose:
            diagnose(args, suite, merger, subsets[2][0], clock)

    # 5. LoRA adapters and DivMerge over them
    if not args.no_lora and args.lora_k <= len(args.tasks):
        lora_ft = llm_train.FinetuneSettings(lr=args.lora_lr, batch_size=args.ft_batch, max_steps=args.ft_max_steps,
                                      check_every=args.ft_check, target=max(args.target, 1e-9), seed=args.seed,
                                      eval_batch=args.eval_batch)  # fmt: skip
        subset = task_subsets(list(args.tasks), args.lora_k, 1, args.seed)[0]
        for t in subset:
            if not clock.fits(30) and not suite.adapter(t).exists():
                log(f"time limit: stopping before LoRA adapter {t}")
                return finish(args, models, clock)
            models.setdefault("adapter_test", {})[t] = llm_train.train_adapter(suite, t, lora_ft, args.device,
                                                                        args.lora_rank, log)["test"]  # fmt: skip
        write_models(args, models)
        merger.adapter_test = models["adapter_test"]
        run_one(args, merger, LORA_METHOD, subset, done, csv_path, clock)
    return finish(args, models, clock)


def cached_json(path: Path, compute):
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    path.write_text(json.dumps(value, indent=1))
    return value


def model_stats(args, suite: ls.LlmSuite) -> dict:
    log("evaluating base and experts; task-vector statistics")
    base = ls.accuracies(suite.base, suite, args.tasks, "test", args.device, args.eval_batch)
    experts = {t: ls.accuracies(suite.expert(t), suite, [t], "test", args.device, args.eval_batch)[t]
               for t in args.tasks}  # fmt: skip
    stats = ls.task_vector_stats(suite.base, {t: suite.expert(t) for t in args.tasks}, args.device)
    for t in args.tasks:
        log(f"  {t}: base {base[t]:.3f}, expert {experts[t]:.3f}, ||tau||/||theta0|| "
            f"{100 * stats['relative_norm'][t]:.3f}%, changed {100 * stats['fraction_changed'][t]:.1f}%")  # fmt: skip
    return {"base_test": base, "expert_test": experts, "task_vectors": stats}


def settings_line(args) -> str:
    return (f"Tasks: {', '.join(args.tasks)} (plain prompts, one code word or a short exact answer). Experts: full "
            f"fine-tuning, Adam lr {args.ft_lr}, batch {args.ft_batch}, answer tokens only, until test accuracy >= "
            f"{args.target}. Learned merges: Adam lr {args.lr}, {args.epochs} epochs, batch {args.batch_per_task} x k, "
            f"{args.prompts_task} prompts per task at task level and {args.prompts_layer} at layer level. "
            f"Test/val pairs per task: {args.n_test}/{args.n_val}. Device: {args.device}.")  # fmt: skip


def write_models(args, models: dict) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality_llm_models.json").write_text(json.dumps(models, indent=1))


def restore_rows(args, csv_path: Path) -> set[tuple[str, str]]:
    """The CSV rewritten from the cached results of these settings; returns the (method, subset) done."""
    cache = args.cache / f"merges-{settings_key(args)}.jsonl"
    rows = [json.loads(x) for x in cache.read_text().splitlines()] if cache.exists() else []
    for r in rows:
        path = learned_path(args, r["method"], r["subset"].split("+"))
        if "steps" in r and "coef_task" not in r and path.exists():
            r["coef_task"] = task_coefficients(json.loads(path.read_text()), r["subset"].split("+"))
    csv_path.unlink(missing_ok=True)
    for r in rows:
        append_row(csv_path, r)
    return {(r["method"], r["subset"]) for r in rows}


def record(args, row: dict, done: set, csv_path: Path) -> None:
    with open(args.cache / f"merges-{settings_key(args)}.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    append_row(csv_path, row)
    done.add((row["method"], row["subset"]))


def add_base_row(args, models, subset, done, csv_path) -> None:
    if ("base", "+".join(subset)) in done:
        return
    acc = {t: models["base_test"][t] for t in subset}
    norm = normalized(acc, {t: models["expert_test"][t] for t in subset})
    row = {"method": "base", "k": len(subset), "subset": "+".join(subset), "anp": sum(norm.values()) / len(norm),
           "seconds": 0.0, "acc": acc, "norm": norm}  # fmt: skip
    record(args, row, done, csv_path)


def run_one(args, merger: Merger, method: str, subset, done, csv_path, clock: Clock) -> None:
    if (method, "+".join(subset)) in done:
        return
    est = merger.estimate(method, len(subset))
    if not clock.fits(est):
        log(f"  {method:<22} skipped: ~{est:.0f}s left needed, {clock.elapsed():.0f}s used of {clock.limit:.0f}s")
        return
    row = merger.run(method, subset)
    record(args, row, done, csv_path)
    extra = f"  lambda {row['lambda']}" if "lambda" in row else ""
    if "steps" in row:
        extra = f"  {row['steps']} steps, loss {row['loss_first']:.4f} -> {row['loss_last']:.4f}"
    log(f"  {method:<22} ANP {row['anp']:.3f}  ({row['seconds']:.0f}s){extra}")


def diagnose(args, suite: ls.LlmSuite, merger: Merger, subset, clock: Clock) -> None:
    """Item 3 of issue 10 on the first pair: searched task-level optimum vs learned coefficients, JS by
    position kind (blockmerge.suite.llm_diagnose.diagnose_pair); written to quality_llm_diagnosis.json."""
    path = args.out / "quality_llm_diagnosis.json"
    records = {m: json.loads(learned_path(args, m, subset).read_text()) for m in LEARNED
               if learned_path(args, m, subset).exists()}  # fmt: skip
    key = settings_key(args) + ":" + ",".join(sorted(records))  # recomputed when more merges are done
    if path.exists() and json.loads(path.read_text()).get("settings_key") == key:
        return
    if not clock.fits(60 if args.device.startswith("cuda") else 900):
        log("  diagnosis skipped: time limit")
        return
    log(f"diagnosis of {'+'.join(subset)}: grid search of task-level coefficients, JS by position")
    for t in subset:
        if t not in merger.expert_val:
            merger.expert_val[t] = merger.evaluate(suite.expert(t), [t], "val")[t]
    res = llm_diagnose.diagnose_pair(suite, subset, records, merger.expert_val, args.device,
                                     n_prompts=args.prompts_task, batch_size=args.eval_batch)  # fmt: skip
    res["settings_key"] = key
    path.write_text(json.dumps(res, indent=1))


def coefficient_lines(rows: list[dict]) -> list[str]:
    """Each learned merge's coefficients, mean over blocks per task, with its loss and step count."""
    learned = [r for r in rows if r.get("coef_task")]
    if not learned:
        return []
    lines = ["", "Learned coefficients (per task, mean over blocks at layer level; init 1/k for DivMerge, 0.3 for"
             " AdaMerging), loss at the first step -> mean of the last 10:", "",
             "| method | k | subset | steps | loss | coefficients |", "|---|---:|---|---:|---|---|"]  # fmt: skip
    for r in learned:
        coef = ", ".join(f"{t} {c:.2f}" for t, c in r["coef_task"].items())
        lines.append(f"| {r['method']} | {r['k']} | {r['subset']} | {r['steps']} | "
                     f"{float(r['loss_first']):.3f} -> {float(r['loss_last']):.3f} | {coef} |")  # fmt: skip
    return lines


def diagnosis_lines(d: dict) -> list[str]:
    """The markdown of quality_llm_diagnosis.json."""
    sub = d["subset"]
    best = d["search_top"][0]
    lines = ["", f"Diagnosis on {' + '.join(sub)} (validation split; JS = teacher-forced JS(expert || merged) on "
             "unlabeled prompts, mean per position kind: first answer token / later tokens / EOS):", "",
             f"Best task-level coefficients by grid search ({', '.join(map(str, d['grid']))}): "
             f"{best['coefficients']} (val ANP {best['val_anp']:.3f}).", "",
             "| coefficients | coefficient per task (mean [min, max] over blocks) | val ANP | "
             + " | ".join(f"JS {t} first / rest / EOS" for t in sub) + " | loss first -> last |",
             "|---|---|---:|" + "---|" * len(sub) + "---|"]  # fmt: skip

    def js_cells(p):
        return " | ".join(f"{p['js'][t]['js_first']:.4f} / {p['js'][t]['js_rest']:.4f} / {p['js'][t]['js_eos']:.4f}"
                          for t in sub)  # fmt: skip

    for name, p, coef, loss in [("searched optimum", d["search_best"], best["coefficients"], ""),
                                ("task arithmetic 1.0", d["task_arithmetic_1"], [1.0] * len(sub), "")]:  # fmt: skip
        lines.append(
            f"| {name} | {', '.join(f'{c:.2f}' for c in coef)} | {p['val_anp']:.3f} | {js_cells(p)} | {loss} |"
        )
    for m, p in d["learned"].items():
        coef = ", ".join(f"{a:.2f} [{lo:.2f}, {hi:.2f}]" for a, lo, hi in zip(p["coef_mean"], p["coef_min"],
                                                                            p["coef_max"], strict=True))  # fmt: skip
        lines.append(f"| {m} | {coef} | {p['val_anp']:.3f} | {js_cells(p)} | "
                     f"{p['loss_first']:.4f} -> {p['loss_last']:.4f} |")  # fmt: skip
    conf = {t: d["search_best"]["js"][t]["expert_confidence"] for t in sub}
    lines += ["", "Experts' mean probability of their own first answer token: "
              + ", ".join(f"{t} {c:.3f}" for t, c in conf.items()) + "."]  # fmt: skip
    return lines


def finish(args, models: dict, clock: Clock) -> int:
    if (args.out / "quality_llm.csv").exists():
        write_report(args.out)
        print((args.out / "quality_llm.md").read_text())
    log(f"done in {clock.elapsed():.0f}s; results in {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (llm_train.TargetNotReached, FileNotFoundError) as e:
        print(f"quality_llm: error: {e}", file=sys.stderr)
        sys.exit(1)
