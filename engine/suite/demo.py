"""`blockmerge demo`: build (or reuse) the synthetic task suite and compare merging methods on subsets of
k tasks, printing per-task normalised accuracy (merged / expert) and ANP for each method.

Every merge goes through blockmerge like any other model: static methods via `blockmerge.merge.run.run_merge`
with mergekit-style configs, learned ones via `blockmerge.learn.full.learn` + `write_merged`; merged
checkpoints are written to a temporary folder, loaded with transformers, evaluated and deleted."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from blockmerge.suite.build import VARIANTS, build_suite
from blockmerge.suite.evaluate import accuracy, anp, load_model, normalized, task_subsets
from blockmerge.suite.protocol import TaskSuite

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
    # not a method: per-task coefficients searched on the validation split, an upper reference for the
    # task-level methods (opt-in, slow: coordinate ascent over ORACLE_GRID)
    "task_oracle": ("oracle", {}),
}
DEFAULT_METHODS = [m for m, (kind, _) in METHODS.items() if kind != "oracle"]
ORACLE_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


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


def _expert_dirs(suite: TaskSuite, subset: Sequence[str]) -> list[str]:
    return [str(suite.expert(t)) for t in subset]


def static_config(
    method: str, suite: TaskSuite, subset: Sequence[str], s: Settings, lam: float | Sequence[float] = 1.0
) -> dict:
    """The mergekit-style config of a static method on a subset of the suite's experts."""
    experts = _expert_dirs(suite, subset)
    if method == "average":
        return {"merge_method": "linear", "models": [{"model": e, "parameters": {"weight": 1.0}} for e in experts]}
    if method == "task_arithmetic":  # lam: one weight for every expert, or one per expert
        lams = list(lam) if isinstance(lam, (list, tuple)) else [lam] * len(experts)
        models = [{"model": e, "parameters": {"weight": w}} for e, w in zip(experts, lams, strict=True)]
        return {"merge_method": "task_arithmetic", "base_model": str(suite.base), "models": models}
    if method in ("ties", "dare_ties"):
        density = s.ties_density if method == "ties" else s.dare_density
        params = {"normalize": True, "lambda": 1.0} | ({"seed": s.seed} if method == "dare_ties" else {})
        models = [{"model": e, "parameters": {"weight": 1.0, "density": density}} for e in experts]
        return {"merge_method": method, "base_model": str(suite.base), "models": models, "parameters": params}
    raise ValueError(f"unknown static method {method!r}")


class Comparison:
    """Runs methods on subsets of any TaskSuite (blockmerge.suite.protocol); caches the experts' accuracies (the
    normalisers) and the experts' teacher passes."""

    def __init__(self, suite: TaskSuite, settings: Settings | None = None, log: Callable[[str], None] | None = None):
        if not isinstance(suite, TaskSuite):
            raise TypeError(f"{type(suite).__name__} does not implement blockmerge.suite.protocol.TaskSuite")
        self.suite = suite
        self.s = settings or Settings()
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.sets = {split: {t: suite.pairs(t, split) for t in suite.tasks} for split in ("test", "val")}
        self._expert_acc: dict[tuple[str, str], float] = {}
        root = getattr(suite, "root", None)
        self._tmp = None if root is not None else tempfile.TemporaryDirectory(prefix="blockmerge-teachers-")
        # per (expert, prompts) entries, reused across subsets
        self.teacher_cache = Path(root) / "teacher_cache" if root is not None else Path(self._tmp.name)

    def expert_accuracy(self, task: str, split: str = "test") -> float:
        if (task, split) not in self._expert_acc:
            self._expert_acc[task, split] = self.accuracy(load_model(self.suite.expert(task)), task, split)
        return self._expert_acc[task, split]

    def accuracy(self, model, task: str, split: str = "test") -> float:
        return accuracy(model, self.sets[split][task], self.suite, self.suite.max_new_tokens(task))

    def evaluate(self, model_dir: str | Path, subset: Sequence[str], split: str = "test") -> dict[str, float]:
        model = load_model(model_dir)
        return {t: self.accuracy(model, t, split) for t in subset}

    def _merge_static(self, method: str, subset, out: Path, lam: float | Sequence[float] = 1.0) -> Path:
        from blockmerge.merge.run import run_merge

        return run_merge(static_config(method, self.suite, subset, self.s, lam), out, force=True, progress=False)

    def learn_kwargs(self, subset: Sequence[str]) -> dict:
        """The DivMerge/AdaMerging settings of this comparison (for learn() and divmerge.loss())."""
        return dict(
            max_new_tokens=max(self.suite.max_new_tokens(t) for t in subset),
            eos_token_id=self.suite.eos_token_id,
            cache_dir=self.teacher_cache,
            progress=self.s.progress,
            attn_implementation="eager",
        )

    def inputs(self, subset: Sequence[str]) -> list[list[list[int]]]:
        """Each task's unlabeled prompts as token ids (the data of learned merges)."""
        return [[self.suite.encode_prompt(p) for p in self.suite.unlabeled(t, self.s.n_unlabeled)] for t in subset]

    def _learn(self, opts: dict, subset, out: Path) -> tuple[Path, dict]:
        from blockmerge.learn.full import learn, write_merged

        experts = _expert_dirs(self.suite, subset)
        res = learn(
            self.suite.base,
            experts,
            self.inputs(subset),
            level=opts["level"],
            objective=opts["objective"],
            steps=self.s.learn_steps,
            lr=self.s.learn_lr,
            batch_size=self.s.learn_batch,
            seed=self.s.seed,
            **self.learn_kwargs(subset),
        )
        write_merged(self.suite.base, experts, res.coefficients, out, force=True, progress=False)
        info = {
            "loss_first": res.losses[0] if res.losses else float("nan"),
            "loss_last": sum(res.losses[-5:]) / max(1, len(res.losses[-5:])),
            "coef_mean": float(res.coefficients.mean()),
            "coefficients": res.coefficients.tolist(),  # [task][block], blocks as in res.block_names
            "blocks": list(res.block_names),
            "sec_per_step": res.seconds_per_step,
        }
        return out, info

    def _task_oracle(self, subset, out: Path) -> dict:
        """Per-task coefficients maximising validation ANP: the best common value on ORACLE_GRID, then
        coordinate ascent (two sweeps over the tasks); leaves the best merge in `out`."""
        ev = {t: self.expert_accuracy(t, "val") for t in subset}
        seen: dict[tuple[float, ...], float] = {}

        def score(c: tuple[float, ...]) -> float:
            if c not in seen:
                self._merge_static("task_arithmetic", subset, out, c)
                seen[c] = anp(self.evaluate(out, subset, "val"), ev)
            return seen[c]

        best = max((tuple([g] * len(subset)) for g in ORACLE_GRID), key=score)
        for _ in range(2):
            for i in range(len(subset)):
                best = max((best[:i] + (g,) + best[i + 1 :] for g in ORACLE_GRID), key=score)
        self._merge_static("task_arithmetic", subset, out, best)
        return {"coefficients": [[c] for c in best], "val_anp": seen[best]}

    def run(self, subset: Sequence[str], methods: Sequence[str]) -> list[dict]:
        """One row per method: per-task accuracy and normalised accuracy on the test split, ANP, and the
        merge's coefficients (learned methods: `coefficients` [task][block]; task arithmetic: `lambda`)."""
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
                        ev = {t: self.expert_accuracy(t, "val") for t in subset}
                        for lam in self.s.ta_lambdas:
                            self._merge_static(method, subset, out, lam)
                            score = anp(self.evaluate(out, subset, "val"), ev)
                            if best is None or score > best[1]:
                                best = (lam, score)
                        self._merge_static(method, subset, out, best[0])
                        info = {"lambda": best[0], "val_anp": best[1]}
                    elif kind == "oracle":
                        info = self._task_oracle(subset, out)
                    elif kind == "reference":
                        out = self.suite.base
                    elif kind == "static":
                        self._merge_static(method, subset, out)
                    else:
                        _, info = self._learn(opts, subset, out)
                    acc = self.evaluate(out, subset)
                    norm = normalized(acc, {t: self.expert_accuracy(t) for t in subset})
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
        "--suite",
        default=None,
        help="MODULE:FUNCTION returning a blockmerge.suite.protocol.TaskSuite (default: the built-in suite)",
    )
    p.add_argument(
        "--cache", default=None, help="suite cache folder (default $BLOCKMERGE_CACHE or ~/.cache/blockmerge)"
    )
    p.add_argument("--rebuild", action="store_true", help="rebuild the built-in suite even if it is cached")
    p.add_argument("--steps", type=int, default=None, help="learning steps of DivMerge/AdaMerging")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated methods to compare, among: {', '.join(METHODS)} (default: all but "
        f"{', '.join(m for m in METHODS if m not in DEFAULT_METHODS)})",
    )
    p.add_argument("--seed", type=int, default=0, help="suite, subsets and DARE seed (default 0)")


def quiet_transformers() -> None:
    """No per-checkpoint 'Loading weights' bars: the demo loads dozens of tiny models."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_suite(
    spec: str | None, cache=None, seed: int = 0, rebuild: bool = False, variant: str = "default"
) -> TaskSuite:
    """The suite named by `spec` ('MODULE:FUNCTION', called with no argument), or the built-in one (its
    `variant`, blockmerge.suite.build.VARIANTS, built with `seed`)."""
    if spec is None:
        if variant not in VARIANTS:
            raise ValueError(f"suite variant {variant!r}: expected one of {', '.join(VARIANTS)}")
        return build_suite(cache, dataclasses.replace(VARIANTS[variant], seed=seed), rebuild=rebuild)
    import importlib

    module, _, func = spec.partition(":")
    if not module or not func:
        raise ValueError(f"--suite {spec!r}: expected MODULE:FUNCTION")
    try:
        suite = getattr(importlib.import_module(module), func)()
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--suite {spec!r}: {e}") from None
    if not isinstance(suite, TaskSuite):
        raise ValueError(
            f"--suite {spec!r}: {type(suite).__name__} does not implement blockmerge.suite.protocol.TaskSuite"
        )
    return suite


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    quiet_transformers()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"--methods: unknown method {m!r}; known: {', '.join(METHODS)}")
    suite = load_suite(args.suite, args.cache, args.seed, args.rebuild)
    if not 2 <= args.k <= len(suite.tasks):
        raise ValueError(f"--k {args.k}: expected 2..{len(suite.tasks)}")
    settings = Settings(seed=args.seed)
    if args.steps is not None:
        settings.learn_steps = args.steps
    cmp = Comparison(suite, settings)
    print(f"suite: {suite.name}")
    print("expert accuracy: " + ", ".join(f"{t} {cmp.expert_accuracy(t):.2f}" for t in suite.tasks))
    base = load_model(suite.base)
    print("base accuracy:   " + ", ".join(f"{t} {cmp.accuracy(base, t):.2f}" for t in suite.tasks))
    all_rows = []
    for subset in task_subsets(list(suite.tasks), args.k, args.subsets, args.seed):
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
