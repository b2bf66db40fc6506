"""The built-in task suite (suite-v5): a tiny Llama base broadly pretrained on many generic skills in the
prompt format (tasks.GENERIC), and on prompts under tags it does not know answered by nothing
(tasks.UnknownTagStream), and one expert per task (tasks.TASKS) fully fine-tuned from it, briefly and with a
small learning rate, to perform its computation under a tag the base never saw. The base scores 0 on the
tasks and the task vectors are small, the regime of merging fine-tunes of a pretrained LLM.

Everything is a real Hugging Face checkpoint (config.json, model.safetensors, tokenizer files) in a cache
folder. The build is single-threaded with deterministic algorithms (the same weights whatever the caller's
thread count), and checks itself: each expert must reach `target_acc` on the test split (it is trained
further, a bounded number of rounds, if it falls short) and the base must stay at or below `base_max_acc`
on every task; otherwise the build fails naming the task. The manifest records the settings, accuracies,
task-vector statistics and a fingerprint of the weights; a cached suite that fails the check or whose
files do not match the fingerprint is rebuilt, never used."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from blockmerge.io.cache import default_cache
from blockmerge.io.commit import claim_output
from blockmerge.suite.manifest import SUITE_VERSION, check_manifest, fingerprint, summary, task_vector_stats
from blockmerge.suite.tasks import (
    EOS_ID,
    GENERIC,
    PAD_ID,
    TASK_NAMES,
    CharTokenizer,
    TrainStream,
    UnknownTagStream,
    eval_sets,
    get_task,
)
from blockmerge.suite.tasks import sample_prompts as _sample_prompts
from blockmerge.suite.train import deterministic_single_thread, exact_match, model_config, train


@dataclass(frozen=True)
class SuiteConfig:
    seed: int = 0
    tasks: tuple[str, ...] = tuple(TASK_NAMES)
    generic: tuple[str, ...] = tuple(g.name for g in GENERIC)  # the base's pretraining mixture
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    intermediate: int = 192
    # base: warm-up + cosine over `base_steps` on the mixture of all generic skills (tasks.GENERIC)
    base_steps: int = 1200
    batch_size: int = 64
    base_lr: float = 3e-3
    # experts: constant small lr, validation accuracy checked every `check_every` steps, stopping once it
    # reached `stop_acc` `patience` checks in a row or after `expert_steps`
    expert_steps: int = 200
    expert_batch: int = 32
    expert_lr: float = 3e-4
    tag_lr: float = 3e-2  # > 0: the expert's tag embedding learns at this lr, the known tokens' stay frozen
    check_every: int = 20  # 0: no early stop, the expert trains `expert_steps` with a cosine decay
    stop_acc: float = 0.98
    patience: int = 2
    # the self-check: every expert >= target_acc on the test split (else up to `extra_rounds` more rounds
    # of `expert_steps`), the base <= base_max_acc on every task
    target_acc: float = 0.95
    base_max_acc: float = 0.2
    extra_rounds: int = 2
    n_test: int = 100
    n_val: int = 50

    def key(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:10]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"tasks": list(self.tasks), "generic": list(self.generic)}


DEFAULT = SuiteConfig()
# A small variant that builds in under two minutes, in the regime where merged tasks interfere: four tasks on
# the same words and output positions (each answer is a rearrangement or substitution of the input's
# letters), a 2-layer base, experts trained for a fixed number of steps at a larger lr (no early stop), so
# that each task vector also carries the expert's drift towards its own task. The CI test builds it.
SMALL = SuiteConfig(
    tasks=("shift", "reverse", "rotate", "map"),
    generic=tuple(f"g_{n}" for n in "shift reverse rotate map copy tail rotate_right first last length".split()),
    layers=2,
    base_steps=1500,
    batch_size=32,
    expert_steps=100,
    expert_lr=1e-3,
    stop_acc=1.01,  # never reached: fixed steps
    check_every=0,
)
VARIANTS = {"default": DEFAULT, "small": SMALL}


@dataclass
class Suite:
    """A built suite; implements blockmerge.suite.protocol.TaskSuite."""

    root: Path
    config: SuiteConfig
    manifest: dict = field(default_factory=dict)
    eos_token_id: int = EOS_ID
    pad_token_id: int = PAD_ID

    def __post_init__(self):
        self._tok = CharTokenizer()

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.config.tasks)

    @property
    def base(self) -> Path:
        return self.root / "base"

    def expert(self, task: str) -> Path:
        self._check_task(task)
        return self.root / "experts" / task

    def encode_prompt(self, prompt: str) -> list[int]:
        return self._tok.encode_prompt(prompt)

    def decode_answer(self, ids: Sequence[int]) -> str:
        return self._tok.decode_answer(ids)

    def max_new_tokens(self, task: str) -> int:
        return get_task(task).max_answer + 1

    def pairs(self, task: str, split: str) -> list[tuple[str, str]]:
        self._check_task(task)
        if split not in ("test", "val"):
            raise ValueError(f"split {split!r}: expected 'test' or 'val'")
        test, val = eval_sets(task, self.config.n_test, self.config.n_val, self.config.seed)
        return test if split == "test" else val

    def unlabeled(self, task: str, n: int) -> list[str]:
        held = {p for p, _ in self.pairs(task, "test") + self.pairs(task, "val")}
        return [p for p, _ in _sample_prompts(task, "unlabeled", n, self.config.seed, exclude=held)]

    @property
    def expert_accuracy(self) -> dict[str, float]:
        return dict(self.manifest["expert_accuracy"])

    @property
    def base_accuracy(self) -> dict[str, float]:
        return dict(self.manifest["base_accuracy"])

    def _check_task(self, task: str) -> None:
        if task not in self.config.tasks:
            raise ValueError(f"unknown task {task!r}; this suite has: {', '.join(self.config.tasks)}")


def suite_dir(config: SuiteConfig, cache: str | Path | None = None) -> Path:
    root = Path(cache) if cache is not None else default_cache()
    name = SUITE_VERSION if config == DEFAULT else f"{SUITE_VERSION}-{config.key()}"
    return root / name


def load_cached(root: Path, config: SuiteConfig) -> tuple[Suite | None, str]:
    """The cached suite if it passes the check and its weights match the fingerprint, else (None, why)."""
    path = root / "manifest.json"
    if not path.exists():
        return None, "no suite there"
    try:
        manifest = json.loads(path.read_text())
        why = check_manifest(manifest, config)
        if why is None and manifest.get("fingerprint") != fingerprint(root, config.tasks):
            why = "its weights do not match the manifest's fingerprint"
    except (json.JSONDecodeError, KeyError, OSError) as e:
        why = f"its manifest or weights cannot be read ({e})"
    return (Suite(root, config, manifest), "") if why is None else (None, why)


def build_suite(
    cache: str | Path | None = None, config: SuiteConfig = DEFAULT, rebuild: bool = False, log=None, progress=True
) -> Suite:
    """Return the cached suite for `config`, building it first if it is missing, fails its check, or `rebuild`."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    root = suite_dir(config, cache)
    if not rebuild and (suite := load_cached(root, config)[0]) is not None:
        return suite
    # one builder at a time (writer.OutputClaim): a second process waits, then finds the suite built
    with claim_output(root, force=True, wait=True) as claim:
        if not rebuild:
            suite, why = load_cached(root, config)
            if suite is not None:
                return suite
            if root.exists():
                log(f"suite at {root} cannot be used ({why}): rebuilding")
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one bar over the whole build, not one per checkpoint saved or loaded
        try:
            with deterministic_single_thread():
                manifest = _build(root, config, rebuild, log, progress, claim)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
    return Suite(root, config, manifest)


def _build(root: Path, config: SuiteConfig, rebuild: bool, log, progress: bool, claim) -> dict:
    from blockmerge.io.report import progress as bar_of
    from transformers import AutoModelForCausalLM

    started, cpu_started = time.perf_counter(), time.process_time()
    load = os.getloadavg()[0]
    # Models are written into a partial folder named after the configuration, each with a marker once
    # complete, so an interrupted build resumes where it stopped; the folder is renamed when all is done.
    part = root.parent / f".{root.name}.partial-{config.key()}"
    if rebuild and part.exists():
        shutil.rmtree(part)
    part.mkdir(exist_ok=True)
    for tmp in [*part.glob(".tmp-*"), *part.glob("experts/.tmp-*")]:  # models a killed build was saving
        shutil.rmtree(tmp, ignore_errors=True)
    tok = CharTokenizer()
    sets = {t: eval_sets(t, config.n_test, config.n_val, config.seed) for t in config.tasks}
    held = set().union(*({p for p, _ in te + va} for te, va in sets.values()))
    log(f"building the task suite in {root} ({len(config.tasks)} tasks, seed {config.seed}, 1 thread)")

    def done(folder: Path) -> dict | None:
        marker = folder / "blockmerge_suite.json"
        return json.loads(marker.read_text()) if marker.exists() else None

    def finish(model, folder: Path, info: dict) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_hf(tmp)
        (tmp / "blockmerge_suite.json").write_text(json.dumps(info))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)

    total = config.base_steps + len(config.tasks) * config.expert_steps
    with bar_of(total, "suite build", unit="step", disable=not progress) as bar:
        say = (lambda m: bar.write(m, file=sys.stderr)) if progress else log  # lines above the bar
        info = done(part / "base")
        if info is None:
            torch.manual_seed(config.seed)
            base = AutoModelForCausalLM.from_config(model_config(config), attn_implementation="eager")
            mixture = [TrainStream(g, config.seed, held) for g in config.generic]
            # the skills the experts build on (the tasks' computations) are drawn twice as often
            mixture += [s for s in mixture if s.task.sample in {get_task(t).sample for t in config.tasks}]
            mixture.append(UnknownTagStream(mixture[: len(config.generic)], config.seed))
            train(base, mixture, config.base_steps, config.base_lr, config.batch_size, config.seed, "base", bar)
            generic = {g: exact_match(base, eval_sets(g, 50, 0, config.seed)[0], tok) for g in config.generic}
            acc = {t: exact_match(base, sets[t][0], tok) for t in config.tasks}
            info = {"accuracy": acc, "generic_accuracy": generic, "steps": config.base_steps}
            finish(base, part / "base", info)
        else:
            bar.update(config.base_steps)
        base_acc = info["accuracy"]
        generic_mean = sum(info["generic_accuracy"].values()) / len(info["generic_accuracy"])
        say(f"  base: generic skills {generic_mean:.2f} (mean), tasks {_fmt(base_acc)}")
        for t, a in base_acc.items():
            if a > config.base_max_acc:
                raise RuntimeError(f"suite build failed: the base scores {a:.2f} on task {t} (> {config.base_max_acc})")
        (part / "experts").mkdir(exist_ok=True)
        expert_acc, expert_steps = {}, {}
        for i, t in enumerate(config.tasks):
            info = done(part / "experts" / t)
            if info is None:
                info = _train_expert(part, config, t, i, sets[t], held, tok, bar)
                finish(info.pop("model"), part / "experts" / t, info)
            else:
                bar.update(config.expert_steps)
            expert_acc[t], expert_steps[t] = info["accuracy"], info["steps"]
            say(f"  expert {t}: test accuracy {expert_acc[t]:.2f} after {expert_steps[t]} steps")
            if expert_acc[t] < config.target_acc:
                raise RuntimeError(
                    f"suite build failed: expert {t} reaches {expert_acc[t]:.2f} test accuracy after "
                    f"{expert_steps[t]} steps (target {config.target_acc})"
                )
    stats = task_vector_stats(part / "base", {t: part / "experts" / t for t in config.tasks})
    manifest = {
        "version": SUITE_VERSION,
        "config": config.as_dict(),
        "base_accuracy": base_acc,
        "base_generic_accuracy": round(generic_mean, 4),
        "expert_accuracy": expert_acc,
        "expert_steps": expert_steps,
        "task_vectors": stats,
        "build_seconds": round(time.perf_counter() - started, 1),
        # CPU seconds: the wall time on an idle core (the build is single-threaded), whatever the load
        "build_cpu_seconds": round(time.process_time() - cpu_started, 1),
        "load_average": round(load, 2),
        "torch": torch.__version__,
        "fingerprint": fingerprint(part, config.tasks),
    }
    (part / "manifest.json").write_text(json.dumps(manifest, indent=2))
    claim.commit(part)
    log(summary(manifest))
    return manifest


def _train_expert(part: Path, config: SuiteConfig, t: str, i: int, split, held, tok, bar) -> dict:
    """Fine-tune the base on task t until validation accuracy reaches stop_acc (constant lr), or for
    `expert_steps` with a cosine decay when check_every is 0 (no early stop: the lr anneals, so the expert
    does not end on a noisy step); then, while the test accuracy is under target_acc, up to `extra_rounds`
    further rounds. Returns the model and its record."""
    from transformers import AutoModelForCausalLM

    test, val = split
    torch.manual_seed(config.seed * 1000 + i + 1)
    model = AutoModelForCausalLM.from_pretrained(part / "base", dtype=torch.float32, attn_implementation="eager")
    stream = [TrainStream(t, config.seed + 1, held)]
    new_tokens = [tok.ids[get_task(t).tag]] if config.tag_lr > 0 else []
    check = lambda m: exact_match(m, val, tok) >= config.stop_acc  # noqa: E731
    steps = acc = 0
    for round_ in range(1 + config.extra_rounds):
        if round_ > 0:  # the bar counted one round per expert: a further round extends it
            bar.total += config.expert_steps
            bar.refresh()
        taken = train(model, stream, config.expert_steps, config.expert_lr, config.expert_batch,
                      config.seed + round_, t, bar, cosine=not config.check_every, check=check,
                      check_every=config.check_every, patience=config.patience, new_tokens=new_tokens,
                      new_token_lr=config.tag_lr)  # fmt: skip
        bar.update(config.expert_steps - taken)  # an early stop skips the rest of the round
        steps += taken
        acc = exact_match(model, test, tok)
        if acc >= config.target_acc:
            break
    return {"model": model, "accuracy": acc, "steps": steps}


def _fmt(acc: dict[str, float]) -> str:
    return " ".join(f"{t}={a:.2f}" for t, a in acc.items())
