"""The built-in task suite (suite-v3): a tiny Llama base broadly pretrained on many generic skills in the
prompt format (tasks.GENERIC), and one expert per task (tasks.TASKS) fully fine-tuned from it, briefly and
with a small learning rate, to perform its computation under a tag the base never saw. The base scores ~0
on the tasks and the task vectors are small, the regime of merging fine-tunes of a pretrained LLM.

Everything is a real Hugging Face checkpoint (config.json, model.safetensors, tokenizer files) in a cache
folder. The build is single-threaded with deterministic algorithms (the same weights whatever the caller's
thread count), and checks itself: each expert must reach `target_acc` on the test split (it is trained
further, a bounded number of rounds, if it falls short) and the base must stay at or below `base_max_acc`
on every task; otherwise the build fails naming the task. The manifest records the settings, accuracies,
task-vector statistics and a fingerprint of the weights; a cached suite that fails the check or whose
files do not match the fingerprint is rebuilt, never used."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
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
from blockmerge.suite.evaluate import accuracy
from blockmerge.suite.tasks import (
    EOS_ID,
    GENERIC,
    PAD_ID,
    TASK_NAMES,
    VOCAB,
    CharTokenizer,
    TrainStream,
    eval_sets,
    get_task,
)
from blockmerge.suite.tasks import sample_prompts as _sample_prompts

SUITE_VERSION = "suite-v3"


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
    tag_lr: float = 1e-2  # > 0: the expert's tag embedding learns at this lr, the known tokens' stay frozen
    check_every: int = 20
    stop_acc: float = 0.98
    patience: int = 2
    # the self-check: every expert >= target_acc on the test split (else up to `extra_rounds` more rounds
    # of `expert_steps`), the base <= base_max_acc on every task
    target_acc: float = 0.9
    base_max_acc: float = 0.2
    extra_rounds: int = 2
    n_test: int = 100
    n_val: int = 50

    def key(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:10]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"tasks": list(self.tasks), "generic": list(self.generic)}


DEFAULT = SuiteConfig()


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


def model_config(cfg: SuiteConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=1,
        eos_token_id=EOS_ID,
        torch_dtype="float32",
    )


def make_batch(pairs: list[tuple[str, str]], tok: CharTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and completion-only labels (-100 on BOS, prompt and padding)."""
    rows, labels = [], []
    for p, a in pairs:
        pi = tok.encode(p, bos=True)
        ai = tok.encode(a, eos=True)
        rows.append(pi + ai)
        labels.append([-100] * len(pi) + ai)
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), PAD_ID, dtype=torch.long)
    lab = torch.full((len(rows), n), -100, dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(lb)] = torch.tensor(lb)
    return ids, lab


def completion_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # right padding + causal attention: real positions never attend to padding, no mask needed
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def train(
    model,
    streams: list[TrainStream],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    desc: str,
    bar=None,
    cosine: bool = True,
    check=None,
    check_every: int = 0,
    patience: int = 1,
    new_tokens: Sequence[int] = (),
    new_token_lr: float = 0.0,
) -> int:
    """AdamW with linear warm-up then cosine decay (or constant lr); each batch draws its tasks uniformly
    from `streams`. With `check`, stop as soon as check(model) was true `patience` times in a row (tested
    every `check_every` steps). `bar` (tqdm) advances one per step. Returns the number of steps taken.

    With `new_tokens`, the input embeddings of the base's known tokens stay frozen and the rows of
    `new_tokens` (a tag the base never saw) learn with their own `new_token_lr`, as when a token is added to
    a pretrained model's vocabulary: a new row starts far from where it must go."""
    tok = CharTokenizer()
    rng = random.Random(f"batches/{seed}/{desc}")
    emb = model.get_input_embeddings().weight
    groups = [{"params": [p for p in model.parameters() if p is not emb or not new_tokens]}]
    if new_tokens:
        keep = torch.zeros(emb.shape[0], 1)
        keep[list(new_tokens)] = 1.0
        emb.register_hook(lambda g: g * keep)
        groups.append({"params": [emb], "lr": new_token_lr})
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.5 * (1 + math.cos(math.pi * s / steps)) if cosine else 1.0)
    )
    model.train()
    hits = 0
    for step in range(steps):
        pairs = [streams[rng.randrange(len(streams))].next() for _ in range(batch_size)]
        ids, lab = make_batch(pairs, tok)
        loss = completion_loss(model, ids, lab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{desc} loss {loss.item():.3f}", refresh=False)
        if check is not None and check_every and (step + 1) % check_every == 0:
            model.eval()
            hits = hits + 1 if check(model) else 0
            if hits >= patience:
                return step + 1
            model.train()
    model.eval()
    return steps


@contextlib.contextmanager
def deterministic_single_thread():
    """One intra-op thread and deterministic algorithms while training, the caller's settings restored after:
    the weights do not depend on the caller's thread count (reductions split over threads round
    differently), and no nondeterministic kernel is used."""
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.set_num_threads(threads)


def fingerprint(root: Path, tasks: Sequence[str]) -> str:
    """sha256 over the base's and the experts' model.safetensors."""
    h = hashlib.sha256()
    for d in [root / "base"] + [root / "experts" / t for t in tasks]:
        h.update((d / "model.safetensors").read_bytes())
    return h.hexdigest()


def task_vector_stats(base_dir: Path, expert_dirs: dict[str, Path]) -> dict:
    """Per expert: ||tau|| / ||theta0|| and the fraction of weights changed by more than 1% of their
    tensor's RMS; between experts: mean and largest cosine of the flattened task vectors."""
    from safetensors.torch import load_file

    base = load_file(base_dir / "model.safetensors")
    names = sorted(base)
    theta0 = torch.cat([base[n].flatten().double() for n in names])
    rms = torch.cat([torch.full((base[n].numel(),), base[n].double().pow(2).mean().sqrt().item()) for n in names])
    taus, out = {}, {"relative_norm": {}, "fraction_changed": {}}
    for t, d in expert_dirs.items():
        e = load_file(d / "model.safetensors")
        tau = torch.cat([e[n].flatten().double() for n in names]) - theta0
        taus[t] = tau
        out["relative_norm"][t] = round((tau.norm() / theta0.norm()).item(), 5)
        out["fraction_changed"][t] = round((tau.abs() > 0.01 * rms).double().mean().item(), 5)
    cos = [
        (taus[a] @ taus[b] / (taus[a].norm() * taus[b].norm())).item()
        for i, a in enumerate(taus)
        for b in list(taus)[i + 1 :]
    ]
    out["cosine_mean"] = round(sum(cos) / len(cos), 4) if cos else None
    out["cosine_max"] = round(max(cos), 4) if cos else None
    return out


def check_manifest(manifest: dict, config: SuiteConfig) -> str | None:
    """Why a manifest's suite cannot be used for `config` (None if it can)."""
    if manifest.get("version") != SUITE_VERSION or manifest.get("config") != config.as_dict():
        return "it was built with other settings"
    for t in config.tasks:
        e, b = manifest["expert_accuracy"].get(t, 0.0), manifest["base_accuracy"].get(t, 1.0)
        if e < config.target_acc:
            return f"expert {t} is at {e:.2f} test accuracy (< {config.target_acc})"
        if b > config.base_max_acc:
            return f"the base is at {b:.2f} on {t} (> {config.base_max_acc})"
    return None


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
            train(base, mixture, config.base_steps, config.base_lr, config.batch_size, config.seed, "base", bar)
            generic = {g: accuracy(base, eval_sets(g, 50, 0, config.seed)[0], tok) for g in config.generic}
            acc = {t: accuracy(base, sets[t][0], tok, get_task(t).max_answer + 1) for t in config.tasks}
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
    """Fine-tune the base on task t until validation accuracy reaches stop_acc; then, while the test
    accuracy is under target_acc, up to `extra_rounds` further rounds. Returns the model and its record."""
    from transformers import AutoModelForCausalLM

    test, val = split
    torch.manual_seed(config.seed * 1000 + i + 1)
    model = AutoModelForCausalLM.from_pretrained(part / "base", dtype=torch.float32, attn_implementation="eager")
    stream = [TrainStream(t, config.seed + 1, held)]
    new_tokens = [tok.ids[get_task(t).tag]] if config.tag_lr > 0 else []
    budget = get_task(t).max_answer + 1
    check = lambda m: accuracy(m, val, tok, budget) >= config.stop_acc  # noqa: E731
    steps = acc = 0
    for round_ in range(1 + config.extra_rounds):
        taken = train(model, stream, config.expert_steps, config.expert_lr, config.expert_batch,
                      config.seed + round_, t, bar if round_ == 0 else None, cosine=False, check=check,
                      check_every=config.check_every, patience=config.patience, new_tokens=new_tokens,
                      new_token_lr=config.tag_lr)  # fmt: skip
        if round_ == 0:
            bar.update(config.expert_steps - taken)
        steps += taken
        acc = accuracy(model, test, tok, budget)
        if acc >= config.target_acc:
            break
    return {"model": model, "accuracy": acc, "steps": steps}


def summary(manifest: dict) -> str:
    tv = manifest["task_vectors"]
    lines = [
        f"suite {manifest['version']} built in {manifest['build_seconds']:.0f}s, {manifest['build_cpu_seconds']:.0f} "
        f"CPU seconds (load average {manifest['load_average']} at the start); base: generic skills "
        f"{manifest['base_generic_accuracy']:.2f}",
        f"  {'task':<10} {'base':>5} {'expert':>6} {'steps':>5} {'|tau|/|theta0|':>14} {'changed':>8}",
    ]
    for t, a in manifest["expert_accuracy"].items():
        lines.append(
            f"  {t:<10} {manifest['base_accuracy'][t]:>5.2f} {a:>6.2f} {manifest['expert_steps'][t]:>5} "
            f"{tv['relative_norm'][t]:>14.4f} {tv['fraction_changed'][t]:>8.3f}"
        )
    if tv["cosine_mean"] is not None:
        lines.append(f"  cosine between task vectors: mean {tv['cosine_mean']:.3f}, largest {tv['cosine_max']:.3f}")
    return "\n".join(lines)


def _fmt(acc: dict[str, float]) -> str:
    return " ".join(f"{t}={a:.2f}" for t, a in acc.items())
