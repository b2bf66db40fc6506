"""The DivMerge learner, one for every StreamedMergedModel (blockmerge.learn.protocol): teacher-forced
batches mixing tasks, the teacher pass through its cache, Adam on Gamma, the result record, and the
`divmerge` flow (config -> inputs -> learn -> write into a claimed OUT).

Gamma is per task ('task' level: one value broadcast over the blocks, its gradient summed over them) or
per task and block ('layer' level). AdaMerging's entropy objective starts at 0.3 and is clamped to [0, 1];
the divergences start at 1/T."""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from blockmerge.io.cache import teacher_cache
from blockmerge.io.checkpoint import Checkpoint
from blockmerge.io.commit import OutputExistsError, claim_output
from blockmerge.io.dtypes import parse_device
from blockmerge.io.stream import memory_budget, parse_memory
from blockmerge.learn.losses import Targets
from blockmerge.learn.pipeline import PipelinedMerge, job, on_rank_zero, rank_zero_first, stage_budget
from blockmerge.learn.settings import (
    LearnSettings,
    check_prompts,
    input_files,
    load_config,
    resolve_inputs,
    with_overrides,
)
from blockmerge.learn.teacher import TeacherData, TeacherSpec, teacher_folders
from blockmerge.merge.distributed import Group, in_job

SMALL_MODEL_BYTES = 64 << 20


@dataclass
class LearnResult:
    coefficients: torch.Tensor  # fp32 [T, n_blocks]
    block_names: list[str]
    losses: list[float]  # loss of each step's batch, at the coefficients before that step's update
    objective: str = "js"
    level: str = "layer"
    config: dict = field(default_factory=dict)
    seconds_per_step: float = 0.0

    def to_json(self) -> dict:
        return {
            "objective": self.objective,
            "level": self.level,
            "block_names": self.block_names,
            "coefficients": [
                {name: float(self.coefficients[t, b]) for b, name in enumerate(self.block_names)}
                for t in range(self.coefficients.shape[0])
            ],
            "losses": self.losses,
            "seconds_per_step": self.seconds_per_step,
            "config": self.config,
        }


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, S], right-padded
    rows: torch.Tensor  # [N] batch index of each target position
    cols: torch.Tensor  # [N] sequence position whose output predicts the target
    weights: torch.Tensor  # [N] 1 / (number of target positions of that row's task in the batch)
    targets: Targets | None  # teacher distributions at the N positions (None for the entropy objective)
    tasks: torch.Tensor  # [N] task of each position


def make_batch(items: Sequence[tuple[int, int]], data: TeacherData, pad_id: int = 0) -> Batch:
    """Teacher-forced inputs prompt + continuation[:-1]; the position P-1+i predicts continuation[i]."""
    seqs, rows, cols, tasks, tparts = [], [], [], [], []
    for b, (t, j) in enumerate(items):
        tokens, plen, targets = data.get(t, j)
        n = len(tokens) - plen
        seqs.append(tokens[:-1])
        rows += [b] * n
        cols += list(range(plen - 1, plen - 1 + n))
        tasks += [t] * n
        if targets is not None:
            tparts.append(targets)
    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), pad_id, dtype=torch.int64)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = s
    tasks_t = torch.tensor(tasks)
    counts = torch.bincount(tasks_t)
    weights = 1.0 / counts[tasks_t].double()
    return Batch(ids, torch.tensor(rows), torch.tensor(cols), weights, Targets.cat(tparts) if tparts else None, tasks_t)


def batches(counts: Sequence[int], batch_size: int, seed: int):
    """Endless batches of (task, sequence) pairs mixing tasks, reshuffled each epoch from `seed`."""
    pairs = [(t, j) for t, n in enumerate(counts) for j in range(n)]
    rng = random.Random(seed)
    while True:
        rng.shuffle(pairs)
        for s in range(0, len(pairs), batch_size):
            yield pairs[s : s + batch_size]


def teacher_spec(settings: LearnSettings) -> TeacherSpec:
    return TeacherSpec(max_new_tokens=settings.max_new_tokens, eos_token_id=settings.eos_token_id,
                       full_vocab_max=settings.full_vocab_max, topk=settings.topk,
                       store_dists=settings.objective != "entropy")  # fmt: skip


def teacher_data(merge, inputs, settings: LearnSettings, progress: bool) -> TeacherData:
    """The teachers' continuations and distributions on `inputs`, from the cache or generated into it."""
    cache = settings.cache_dir or teacher_cache()
    return TeacherData(teacher_folders(merge, inputs, cache, teacher_spec(settings), progress))


def learn(kind, base_dir, dirs, inputs, settings: LearnSettings | None = None, *, progress: bool = True,
          num_threads: int | None = None, group: Group | None = None, **overrides) -> LearnResult:  # fmt: skip
    """Learn coefficients of the `kind` (a StreamedMergedModel class) of base + task models `dirs`;
    `inputs[t]` are task t's prompts (token-id lists); `settings` (default: `kind.settings_type`'s defaults)
    with keyword `overrides` of its fields, validated once. `num_threads`: torch intra-op threads while learning
    (restored after); default 1 for models under SMALL_MODEL_BYTES, whose ops are too small to gain from
    threads (and lose badly on a busy CPU), else unchanged. Launched as one of several processes (torchrun) or
    given a `group`, the processes share the work (blockmerge.learn.pipeline) and all return the result."""
    settings = with_overrides(settings, kind.settings_type, overrides)
    dirs = [Path(d) for d in dirs]
    if len(inputs) != len(dirs):
        raise ValueError(f"inputs: {len(inputs)} prompt lists for {len(dirs)} {kind.noun}s")
    for t, x in enumerate(inputs):
        if not x:
            raise ValueError(f"inputs[{t}]: no prompts for {kind.noun} {dirs[t]}")
    if num_threads is None and Checkpoint(base_dir).nbytes < SMALL_MODEL_BYTES:
        num_threads = 1
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        with job(settings.device, group) as group:
            return _learn(kind, Path(base_dir), dirs, inputs, settings, progress, group)
    finally:
        torch.set_num_threads(previous)


def _learn(kind, base_dir: Path, dirs, inputs, settings: LearnSettings, progress: bool, group: Group | None):
    budget = memory_budget(settings.memory, settings.device)
    if group is None:
        merge = kind.open(base_dir, dirs, settings, budget)
        check_prompts(inputs, merge.model.config.get_text_config().vocab_size, dirs)
        return optimize(merge, teacher_data(merge, inputs, settings, progress), settings, progress=progress)
    # one of several processes: this process's device and share of the memory, the teacher pass on rank 0
    # first (the others then read its cache), the steps shared by a pipeline (blockmerge.learn.pipeline)
    device = group.device(parse_device(settings.device))
    if device.type == "cuda":
        settings = settings.model_copy(update={"device": str(device)})
    budget = stage_budget(settings.memory, budget)
    merge = kind.open(base_dir, dirs, settings, budget)
    check_prompts(inputs, merge.model.config.get_text_config().vocab_size, dirs)
    data = rank_zero_first(group, lambda first: teacher_data(merge, inputs, settings, progress and first))
    return optimize(PipelinedMerge(merge, group, budget), data, settings, progress=progress and group.rank == 0)


def optimize(merge, data: TeacherData, settings: LearnSettings, *, progress: bool = True) -> LearnResult:
    """Adam on Gamma over batches mixing tasks; `merge.loss_and_grad(gamma [T, blocks], batch, objective)`
    gives the loss and its streamed gradient."""
    from blockmerge.io.report import progress as bar

    s = settings
    T, nb = merge.T, len(merge.blocks)
    counts = [data.n_seqs(t) for t in range(T)]
    steps = s.n_steps() or max(1, math.ceil(s.epochs * sum(counts) / s.batch_size))
    init = s.init if s.init is not None else 0.3 if s.objective == "entropy" else 1.0 / T
    layer = s.level == "layer"
    gamma = torch.full((T, nb) if layer else (T,), float(init), dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([gamma], lr=s.lr)
    losses: list[float] = []
    stream = batches(counts, s.batch_size, s.seed)
    started = time.perf_counter()
    with bar(steps, f"{merge.command} {s.objective}/{s.level}", unit="step", disable=not progress) as pbar:
        for _ in range(steps):
            batch = make_batch(next(stream), data)
            full = gamma.detach() if layer else gamma.detach()[:, None].expand(T, nb)
            loss, g = merge.loss_and_grad(full, batch, s.objective)
            opt.zero_grad()
            gamma.grad = g if layer else g.sum(1)
            opt.step()
            if s.objective == "entropy":  # AdaMerging keeps coefficients in [0, 1]
                with torch.no_grad():
                    gamma.clamp_(0.0, 1.0)
            losses.append(loss)
            pbar.set_postfix(loss=f"{loss:.4f}")
            pbar.update(1)
    elapsed = time.perf_counter() - started
    coeffs = gamma.detach().clone() if layer else gamma.detach()[:, None].expand(T, nb).clone()
    config = s.model_dump()
    return LearnResult(coeffs, list(merge.block_names), losses, s.objective, s.level, config, elapsed / steps)


def cli_settings(cfg: LearnSettings, *, steps=None, device=None, memory=None, **more) -> LearnSettings:
    """The config with the command line's overrides (checked here, before any work: steps >= 1, a device
    this machine has, a memory size); `more`: other overrides, None = not given."""
    from blockmerge.io.dtypes import parse_device

    if steps is not None and (type(steps) is not int or steps < 1):
        raise ValueError(f"--steps: {steps!r}, expected an integer >= 1")
    parse_device(device or cfg.device)
    update = {k: v for k, v in more.items() if v is not None}
    if steps is not None:
        update.update(steps=steps, epochs=None)
    if device is not None:
        update["device"] = device
    if memory is not None:
        update["memory"] = parse_memory(memory, "--memory")
    return cfg.model_copy(update=update)


def run_divmerge(kind, config, out, *, force: bool = False, progress: bool = True, **overrides):
    """Learn and write: every setting, path and prompt is checked first; OUT is claimed
    (blockmerge.io.commit) for the whole run, learning included. `overrides`: cli_settings'."""
    key, dir_field = kind.entries
    cfg, root = load_config(config, kind.config_type, key)
    cfg = cli_settings(cfg, **overrides)
    base_dir, dirs, inputs = resolve_inputs(cfg, root, key, dir_field)
    used = [base_dir, *dirs, *input_files(cfg, root, key), *([config] if not isinstance(config, dict) else [])]
    if in_job() and os.path.lexists(out) and not force:  # before any work, on every process
        raise OutputExistsError(f"{out}: output already exists (use --force to overwrite)")
    # in a torchrun job, every process learns and rank 0 alone claims OUT and writes it
    with job(cfg.device) as group, contextlib.ExitStack() as claim:
        progress = progress and (group is None or group.rank == 0)
        on_rank_zero(group, lambda: claim.enter_context(claim_output(out, force=force, inputs=used)))
        started = time.perf_counter()
        res = learn(kind, base_dir, dirs, inputs, cfg, progress=progress, group=group)
        info = res.to_json()
        info.update(base_model=str(base_dir), **{key: [str(d) for d in dirs]}, config=cfg.model_dump())
        write = lambda: kind.write(base_dir, dirs, res.coefficients, Path(out), cfg, force=force, progress=progress,
                                   info=info)  # fmt: skip
        path = on_rank_zero(group, write) or Path(out)
    if progress:
        from blockmerge.io.report import final_line

        summary = f"{len(res.losses)} steps, loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f}, wrote {path}"
        print(final_line(f"{kind.command}: {summary}", started), file=sys.stderr)
    return path, res
