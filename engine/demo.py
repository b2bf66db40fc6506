"""`blockmerge demo`: build (or reuse) the synthetic task suite and compare merging methods on subsets of
k tasks, printing per-task normalised accuracy (merged / expert) and ANP for each method.

Every merge goes through blockmerge like any other model: static methods via `blockmerge.merge.run_merge`
with mergekit-style configs, learned ones via `blockmerge.divmerge.learn` + `write_merged`; merged
checkpoints are written to a temporary folder, loaded with transformers, evaluated and deleted."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .evaluate import accuracy, anp, load_model, normalized, task_subsets
from .suite import DEFAULT, Suite, SuiteConfig, build_suite
from .tasks import EOS_ID, MAX_ANSWER, CharTokenizer, sample_prompts

# name -> (kind, options); the order is the table's order
METHODS: dict[str, tuple[str, dict]] = {
    "base": ("reference", {}),  # no merge: the base model itself, for reference
    "average": ("static", {}),
    "task_arithmetic": ("static", {}),
    "ties": ("static", {}),
    "dare_ties": ("static", {}),
    "adamerging_task": ("learned", {"objective": "entropy", "level": "task"}),
    "adamerging_layer": ("learned", {"objective": "entropy", "level": "layer"}),
    "divmerge_js_task": ("learned", {"objective": "js", "level": "task"}),
    "divmerge_js_layer": ("learned", {"objective": "js", "level": "layer"}),
    "divmerge_kl_layer": ("learned", {"objective": "kl", "level": "layer"}),
}


@dataclass
class Settings:
    """Knobs of a comparison; the defaults are the ones the README's tables use."""

    ta_lambdas: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)  # tuned on the validation split (ANP)
    ties_density: float = 0.3
    dare_density: float = 0.5
    n_unlabeled: int = 64  # unlabeled prompts per task for DivMerge / AdaMerging
    learn_steps: int = 100
    learn_batch: int = 16
    learn_lr: float = 1e-2
    seed: int = 0
    threads: int = 1
    progress: bool = False
    extra: dict = field(default_factory=dict)


def _expert_dirs(suite: Suite, subset: Sequence[str]) -> list[str]:
    return [str(suite.expert(t)) for t in subset]


def static_config(method: str, suite: Suite, subset: Sequence[str], s: Settings, lam: float = 1.0) -> dict:
    """The mergekit-style config of a static method on a subset of the suite's experts."""
    experts = _expert_dirs(suite, subset)
    if method == "average":
        return {"merge_method": "linear", "models": [{"model": e, "parameters": {"weight": 1.0}} for e in experts]}
    if method == "task_arithmetic":
        models = [{"model": e, "parameters": {"weight": lam}} for e in experts]
        return {"merge_method": "task_arithmetic", "base_model": str(suite.base), "models": models}
    if method in ("ties", "dare_ties"):
        density = s.ties_density if method == "ties" else s.dare_density
        params = {"normalize": True, "lambda": 1.0} | ({"seed": s.seed} if method == "dare_ties" else {})
        models = [{"model": e, "parameters": {"weight": 1.0, "density": density}} for e in experts]
        return {"merge_method": method, "base_model": str(suite.base), "models": models, "parameters": params}
    raise ValueError(f"unknown static method {method!r}")


class Comparison:
    """Runs methods on subsets of one suite; caches the experts' accuracies used as normalisers."""

    def __init__(self, suite: Suite, settings: Settings | None = None, log: Callable[[str], None] | None = None):
        self.suite = suite
        self.s = settings or Settings()
        self.tok = CharTokenizer()
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.test = {t: suite.eval_sets(t)[0] for t in suite.config.tasks}
        self.val = {t: suite.eval_sets(t)[1] for t in suite.config.tasks}
        self.expert_test = suite.expert_accuracy
        self._expert_val: dict[str, float] = {}

    def expert_val(self, task: str) -> float:
        if task not in self._expert_val:
            self._expert_val[task] = accuracy(load_model(self.suite.expert(task)), self.val[task], self.tok)
        return self._expert_val[task]

    def evaluate(self, model_dir: str | Path, subset: Sequence[str], split: str = "test") -> dict[str, float]:
        model = load_model(model_dir)
        sets = self.test if split == "test" else self.val
        return {t: accuracy(model, sets[t], self.tok) for t in subset}

    def _merge_static(self, method: str, subset, out: Path, lam: float = 1.0) -> Path:
        from .merge import run_merge

        return run_merge(static_config(method, self.suite, subset, self.s, lam), out, force=True, progress=False)

    def _learn(self, opts: dict, subset, out: Path) -> tuple[Path, dict]:
        from .divmerge import learn, write_merged

        inputs = [[self.tok.encode(p, bos=True) for p, _ in self.unlabeled(t)] for t in subset]
        experts = _expert_dirs(self.suite, subset)
        res = learn(
            self.suite.base,
            experts,
            inputs,
            level=opts["level"],
            objective=opts["objective"],
            steps=self.s.learn_steps,
            lr=self.s.learn_lr,
            batch_size=self.s.learn_batch,
            max_new_tokens=MAX_ANSWER + 1,
            eos_token_id=EOS_ID,
            seed=self.s.seed,
            cache_dir=self.suite.root / "teacher_cache",  # per (expert, prompts) entries, reused across subsets
            progress=self.s.progress,
            attn_implementation="eager",
        )
        write_merged(self.suite.base, experts, res.coefficients, out, force=True, progress=False)
        info = {
            "loss_first": res.losses[0] if res.losses else float("nan"),
            "loss_last": sum(res.losses[-5:]) / max(1, len(res.losses[-5:])),
            "coef_mean": float(res.coefficients.mean()),
            "sec_per_step": res.seconds_per_step,
        }
        return out, info

    def unlabeled(self, task: str) -> list[tuple[str, str]]:
        held = {p for p, _ in self.test[task]} | {p for p, _ in self.val[task]}
        return sample_prompts(task, "unlabeled", self.s.n_unlabeled, self.suite.config.seed, exclude=held)

    def run(self, subset: Sequence[str], methods: Sequence[str]) -> list[dict]:
        """One row per method: per-task accuracy and normalised accuracy on the test split, and ANP."""
        threads = torch.get_num_threads()
        torch.set_num_threads(self.s.threads)
        rows = []
        try:
            with tempfile.TemporaryDirectory(prefix="blockmerge-demo-") as tmp:
                tmp = Path(tmp)
                for method in methods:
                    if method not in METHODS:
                        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
                    started = time.perf_counter()
                    kind, opts = METHODS[method]
                    out = tmp / method
                    info: dict = {}
                    if method == "task_arithmetic":
                        best = None
                        ev = {t: self.expert_val(t) for t in subset}
                        for lam in self.s.ta_lambdas:
                            self._merge_static(method, subset, out, lam)
                            score = anp(self.evaluate(out, subset, "val"), ev)
                            if best is None or score > best[1]:
                                best = (lam, score)
                        self._merge_static(method, subset, out, best[0])
                        info = {"lambda": best[0], "val_anp": best[1]}
                    elif kind == "reference":
                        out = self.suite.base
                    elif kind == "static":
                        self._merge_static(method, subset, out)
                    else:
                        _, info = self._learn(opts, subset, out)
                    acc = self.evaluate(out, subset)
                    norm = normalized(acc, {t: self.expert_test[t] for t in subset})
                    row = {
                        "method": method,
                        "k": len(subset),
                        "subset": "+".join(subset),
                        "anp": sum(norm.values()) / len(norm),
                        "acc": acc,
                        "norm": norm,
                        "seconds": time.perf_counter() - started,
                        **info,
                    }
                    rows.append(row)
                    self.log(f"  {method:<18} ANP {row['anp']:.3f}  ({row['seconds']:.0f}s)")
                    if out != self.suite.base:
                        shutil.rmtree(out, ignore_errors=True)
        finally:
            torch.set_num_threads(threads)
        return rows


def format_table(rows: list[dict], subset: Sequence[str]) -> str:
    """Markdown table: method, normalised accuracy per task, ANP."""
    head = "| method | " + " | ".join(subset) + " | ANP |"
    sep = "|---|" + "---:|" * (len(subset) + 1)
    lines = [head, sep]
    for r in rows:
        cells = " | ".join(f"{r['norm'][t]:.2f}" for t in subset)
        lines.append(f"| {r['method']} | {cells} | **{r['anp']:.3f}** |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=int, default=4, help="tasks merged at once (default 4)")
    p.add_argument("--subsets", type=int, default=1, help="how many subsets of k tasks to average over")
    p.add_argument(
        "--cache", default=None, help="suite cache folder (default $BLOCKMERGE_CACHE or ~/.cache/blockmerge)"
    )
    p.add_argument("--rebuild", action="store_true", help="rebuild the suite even if it is cached")
    p.add_argument("--steps", type=int, default=None, help="learning steps of DivMerge/AdaMerging")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods to compare")
    p.add_argument("--seed", type=int, default=0)


def quiet_transformers() -> None:
    """No per-checkpoint 'Loading weights' bars: the demo loads dozens of tiny models."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    quiet_transformers()
    config = DEFAULT if args.seed == 0 else SuiteConfig(seed=args.seed)
    suite = build_suite(args.cache, config, rebuild=args.rebuild)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"--methods: unknown method {m!r}; known: {', '.join(METHODS)}")
    if not 2 <= args.k <= len(suite.config.tasks):
        raise ValueError(f"--k {args.k}: expected 2..{len(suite.config.tasks)}")
    settings = Settings(seed=args.seed)
    if args.steps is not None:
        settings.learn_steps = args.steps
    cmp = Comparison(suite, settings)
    print(f"suite: {suite.root}")
    print("expert accuracy: " + ", ".join(f"{t} {a:.2f}" for t, a in suite.expert_accuracy.items()))
    print("base accuracy:   " + ", ".join(f"{t} {a:.2f}" for t, a in suite.base_accuracy.items()))
    all_rows = []
    for subset in task_subsets(list(suite.config.tasks), args.k, args.subsets, args.seed):
        print(f"\nmerging {args.k} experts: {', '.join(subset)}", flush=True)
        rows = cmp.run(subset, methods)
        all_rows += rows
        print(format_table(rows, subset), flush=True)
    if args.subsets > 1:
        print("\nmean ANP over subsets:")
        for m in methods:
            vals = [r["anp"] for r in all_rows if r["method"] == m]
            print(f"  {m:<18} {sum(vals) / len(vals):.3f}")
    print(f"\ndemo done in {time.perf_counter() - started:.0f}s")
    return 0
