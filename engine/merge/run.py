"""`blockmerge merge CONFIG.yml OUT`: static merges of a base and experts, streamed block by block.

`stream_merge` is the engine every merge uses (static methods here, DivMerge's learned coefficients, LoRA
merged into a base): it validates the inputs, plans the output shards from the base's tensors, streams one
block of every model at a time (the next one prefetched), calls `merge_tensor(name, base, experts)` per
tensor and hands each result to a writer thread that writes it at its place in the output (at most one block
of output queued), so reading, combining and writing overlap. Peak memory is about two blocks of every model
plus one block of output and one tensor's temporaries, whatever the number of layers."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from blockmerge.io.checkpoint import Checkpoint, check_compatible
from blockmerge.io.commit import OutputExistsError, check_not_input, claim_output
from blockmerge.io.dtypes import DTYPE_CHOICES, parse_device, parse_dtype
from blockmerge.io.report import final_line
from blockmerge.io.stream import stream_blocks
from blockmerge.io.writer import CheckpointWriter, parse_size, tensor_nbytes
from blockmerge.merge.call import TensorCall
from blockmerge.merge.config import (
    ConfigError,
    MergeConfig,
    ParameterResolver,
    load_config,
    resolve_path,
    resolve_plan,
)
from blockmerge.merge.distributed import DistributedWriter, Group, in_job
from blockmerge.merge.registry import get_method, methods_help
from blockmerge.merge.slices import config_inputs, is_frankenmerge, run_frankenmerge
from blockmerge.merge.vocab import VocabPlan, plan_vocab, reindex
from tqdm.auto import tqdm

MergeTensorFn = Callable[[str, torch.Tensor, list[torch.Tensor]], torch.Tensor]

_CONFIG_DTYPE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _config_with_dtype(config: dict, dtype: torch.dtype) -> dict | None:
    """The base's config.json with its dtype entry set to `dtype`, or None when nothing changes."""
    name = _CONFIG_DTYPE.get(dtype)
    if name is None or not config:
        return None
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
    if all(config.get(k) == name for k in keys):
        return None
    cfg = dict(config)
    for k in keys:
        cfg[k] = name
    return cfg


def stream_merge(
    base: Checkpoint,
    experts: list[Checkpoint],
    out: str | Path,
    merge_tensor: MergeTensorFn,
    *,
    force: bool = False,
    shard_size: str | int = "5GB",
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    extra_json: dict[str, dict] | None = None,
    desc: str = "merge",
    inputs: Sequence[str | Path] = (),
    group: Group | None = None,
    vocab_rows: dict[str, int] | None = None,
) -> Path:
    """Write OUT = merge_tensor(name, base[name], [e[name] for e in experts]) for every tensor of the base.

    Floating-point outputs are written in `dtype` (default: the base's dtype); other dtypes unchanged.
    config.json and tokenizer files are copied from the base (config's dtype updated when it changes);
    `extra_json` files ({filename: object}) are written last, so they may replace config.json.
    Everything goes to a staging folder beside OUT, renamed into place when complete (writer.OutputClaim);
    OUT may not be, lie in or contain the base, an expert or one of `inputs`. Input tensors with NaN/Inf are
    an error naming the model and tensor (checkpoint.check_finite). With `group` (a torch.distributed job),
    this process merges its share of the blocks into the shared output (blockmerge.merge.distributed).
    `vocab_rows` ({tensor: rows}): vocabulary tensors whose output rows differ from the base's (the models'
    rows may differ too: merge_tensor reindexes them, blockmerge.merge.vocab)."""
    started = time.perf_counter()
    out = Path(out)
    parse_size(shard_size)
    dev = parse_device(device)
    inputs = [base.path, *(e.path for e in experts), *inputs]
    check_not_input(out, inputs)
    if os.path.lexists(out) and not force:  # before any work (checked again under the lock and at commit)
        raise OutputExistsError(f"{out}: output already exists (use --force to overwrite)")
    check_compatible(base, experts, any_rows=set(vocab_rows or ()))
    out_dtype = parse_dtype(dtype)
    models = [base, *experts]
    all_blocks = base.blocks()
    read = {b.name: sum(base.tensors[n].nbytes for n in b.tensors) * len(models) for b in all_blocks}  # bytes
    blocks = all_blocks
    if group is not None:
        dev = group.device(dev)
        blocks = [all_blocks[i] for i in group.share([read[b.name] for b in all_blocks])]
        progress = progress and group.rank == 0
    plan = []
    for b in all_blocks:
        for name in b.tensors:
            info = base.tensors[name]
            dt = out_dtype if (out_dtype is not None and info.dtype.is_floating_point) else info.dtype
            shape = info.shape if name not in (vocab_rows or {}) else (vocab_rows[name], *info.shape[1:])
            plan.append((name, shape, dt))
    slot_dtype = {n: d for n, _, d in plan}
    slot_bytes = {n: tensor_nbytes(s, d) for n, s, d in plan}
    extra = {}
    if out_dtype is not None:
        cfg = _config_with_dtype(base.config, out_dtype)
        if cfg is not None:
            extra["config.json"] = cfg
    extra.update(extra_json or {})
    total = sum(read[b.name] for b in blocks)
    done = 0
    # writes behind the merge in their own thread, at most one block of output queued (bounded memory)
    behind = max(sum(slot_bytes[n] for n in b.tensors) for b in blocks) if blocks else 0
    kw = dict(shard_size=shard_size, force=force, inputs=inputs, write_behind=behind)
    writer = CheckpointWriter(out, plan, **kw) if group is None else DistributedWriter(group, out, plan, **kw)
    with writer:
        bar = tqdm(
            total=total,
            desc=desc,
            unit="B",
            unit_scale=True,
            unit_divisor=1000,
            dynamic_ncols=True,
            disable=not progress,
            file=sys.stderr,
        )
        try:
            for i, (block, tensors) in enumerate(stream_blocks(models, blocks, device=dev)):
                for name in block.tensors:
                    res = merge_tensor(name, tensors[0][name], [t[name] for t in tensors[1:]])
                    if res.dtype != slot_dtype[name]:
                        res = res.to(slot_dtype[name])
                    writer.write(name, res)
                    del res
                nbytes = read[block.name]
                del tensors
                done += nbytes
                bar.set_postfix_str(f"block {i + 1}/{len(blocks)}", refresh=False)
                bar.update(nbytes)
        finally:
            bar.close()
        result = writer.finish(copy_from=base.path, extra_json=extra)
    if progress:
        secs = time.perf_counter() - started
        print(
            final_line(
                f"{desc}: wrote {result}",
                started,
                f"read {done / 1e9:.2f} GB at {done / 1e9 / max(secs, 1e-9):.2f} GB/s",
            ),
            flush=True,
        )
    return result


def plan_merge(
    config: str | Path | dict | MergeConfig, *, seed: int | None = None, dtype=None, extrapolate: bool = False
) -> tuple[Checkpoint, list[Checkpoint], MergeTensorFn, torch.dtype | None, MergeConfig, VocabPlan | None]:
    """Parse and check a mergekit-style config, open the checkpoints and build the per-tensor function.
    Every tensor's parameters are resolved and checked here (registry ranges: density in (0, 1] where it is
    used, slerp's t in [0, 1] unless `extrapolate`, ...), before any tensor is read, so config errors come
    first. `seed` overrides the config's seed of a randomised method. The VocabPlan (or None) says how the
    vocabulary tensors are reindexed (tokenizer_source, blockmerge.merge.vocab)."""
    cfg = load_config(config)
    plan, _ = resolve_plan(cfg)
    base = Checkpoint(plan.base)
    experts = [Checkpoint(p) for p in plan.experts]
    vocab = _plan_vocab(cfg, base, experts)
    check_compatible(base, experts, any_rows=vocab.names if vocab is not None else ())
    if plan.layer_range is not None and tuple(plan.layer_range) != (0, base.num_layers):
        raise ConfigError(
            f"slices: not supported (layer_range {list(plan.layer_range)} does not cover the {base.num_layers} "
            "layers; only a slice equivalent to `models:` is accepted)"
        )
    out_dtype = parse_dtype(dtype) or parse_dtype(plan.out_dtype)
    resolver = ParameterResolver(cfg, plan, base.num_layers, extrapolate=extrapolate)
    method = get_method(plan.method)
    params: dict[str, tuple[list[dict], dict]] = {}
    for name in base.tensors:
        g = resolver.global_params(name)
        if seed is not None and "seed" in g:
            g["seed"] = seed
        params[name] = (resolver.tensor_params(name), g)
        if method.check is not None:
            try:
                method.check(*params[name])
            except ValueError as e:
                raise ConfigError(f"{e} (tensor {name})") from None

    def merge_tensor(name: str, b: torch.Tensor, ex: list[torch.Tensor]) -> torch.Tensor:
        if not b.dtype.is_floating_point:
            return b
        if vocab is not None and name in vocab.names:
            b, *ex = reindex(vocab, [b, *ex])
        tp, g = params[name]
        base_t, models = (b, ex) if plan.has_base else (None, [b, *ex])
        return method.merge(TensorCall(name, base_t, models, tp, g, out_dtype or b.dtype))

    return base, experts, merge_tensor, out_dtype, cfg, vocab


def _plan_vocab(cfg: MergeConfig, base: Checkpoint, experts: list[Checkpoint]) -> VocabPlan | None:
    src = cfg.tokenizer_source
    path = None if src in (None, "base", "union") else resolve_path(src, cfg, "tokenizer_source")
    try:
        return plan_vocab(src, base, experts, path, 0 if cfg.base_model else None)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _output_json(base: Checkpoint, vocab: VocabPlan | None, out_dtype: torch.dtype | None) -> dict[str, dict]:
    """config.json (dtype, vocab_size) and tokenizer files when the vocabulary changes."""
    if vocab is None:
        return {}
    cfg = (_config_with_dtype(base.config, out_dtype) if out_dtype is not None else None) or dict(base.config)
    cfg["vocab_size"] = vocab.rows
    return {**vocab.tokenizer_files, "config.json": cfg}


def run_merge(
    config: str | Path | dict | MergeConfig,
    out: str | Path,
    *,
    force: bool = False,
    shard_size: str | int = "5GB",
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    seed: int | None = None,
    extrapolate: bool = False,
) -> Path:
    """Merge as a mergekit-style config says (YAML path, YAML text, dict or MergeConfig) into OUT."""
    out = Path(out)
    parse_size(shard_size)
    parse_device(device)
    if os.path.lexists(out) and not force:  # before any work (checked again under the lock and at commit)
        raise OutputExistsError(f"{out}: output already exists (use --force to overwrite)")
    config_file = config_inputs(config)
    cfg = load_config(config)
    if is_frankenmerge(cfg):
        if in_job():
            raise ValueError("slices: a frankenmerge runs in one process (launch it without torchrun)")
        return run_frankenmerge(
            cfg, out, force=force, shard_size=shard_size, dtype=dtype, inputs=config_file, progress=progress
        )
    base, experts, fn, out_dtype, cfg, vocab = plan_merge(cfg, seed=seed, dtype=dtype, extrapolate=extrapolate)
    record = cfg.model_dump(exclude_none=True, exclude={"source_dir"})
    inputs = [base.path, *(e.path for e in experts), *config_file]
    group = Group() if in_job() else None  # launched by torchrun / accelerate: share the blocks
    try:
        # rank 0 holds OUT's claim for the whole run; the other ranks write into its staging folder
        with claim_output(out, force=force, inputs=inputs) if group is None or group.rank == 0 else nullcontext():
            return stream_merge(
                base,
                experts,
                out,
                fn,
                force=force,
                shard_size=shard_size,
                dtype=out_dtype,
                device=device,
                progress=progress,
                extra_json={**_output_json(base, vocab, out_dtype), "blockmerge_config.json": record},
                desc=cfg.merge_method,
                inputs=config_file,
                group=group,
                vocab_rows=None if vocab is None else dict.fromkeys(vocab.names, vocab.rows),
            )
    finally:
        if group is not None:
            group.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the method table's lines
    p.epilog = methods_help()
    p.add_argument("config", help="mergekit-style YAML (merge_method: one of the methods below)")
    p.add_argument("out", help="output folder (written to a temporary folder, renamed when complete)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--shard-size", default="5GB", help="maximum shard size, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help="output dtype (default: config's or base's)")
    p.add_argument("--device", default=None, help="where tensors are combined: cpu (default) or cuda")
    p.add_argument(
        "--seed", type=int, default=None, help="seed of dare_*, della* (overrides parameters.seed; default 0)"
    )
    p.add_argument("--extrapolate", action="store_true", help="allow slerp's t outside [0, 1]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or final line")


def run(args: argparse.Namespace) -> int:
    run_merge(
        args.config,
        args.out,
        force=args.force,
        shard_size=args.shard_size,
        dtype=args.dtype,
        device=args.device,
        progress=not args.no_progress,
        seed=args.seed,
        extrapolate=args.extrapolate,
    )
    return 0
