"""Frankenmerges: `merge_method: passthrough` with `slices:`, each slice one source model and a `layer_range`
[start, end) of its decoder layers. The output stacks the slices' layers in order (so its layer count is the
sum of the ranges, written to config.json as num_hidden_layers), takes the embeddings, config and tokenizer
from the first slice's model and the head (final norm, lm_head) from the last slice's model, as mergekit's
planner does. A source's `scale` (per model, or in the slice's or the top-level parameters; gradients and
filters evaluated on the output tensor) multiplies its tensors. Tensors are copied one at a time, so the peak
memory is one tensor whatever the models' size."""

from __future__ import annotations

import os
from pathlib import Path

from blockmerge.io.checkpoint import LAYER_RE, Checkpoint
from blockmerge.io.dtypes import parse_dtype
from blockmerge.io.writer import CheckpointWriter
from blockmerge.merge.config import ConfigError, MergeConfig, evaluate_setting, layer_t, resolve_path


def is_frankenmerge(cfg: MergeConfig) -> bool:
    return cfg.merge_method == "passthrough" and cfg.slices is not None


def renamed(name: str, layer: int) -> str:
    """`name` of a decoder-layer tensor with its layer index replaced."""
    m = LAYER_RE.search(name)
    return f"{name[: m.start(1)]}{layer}{name[m.end(1) :]}"


def plan_layers(cfg: MergeConfig) -> list[tuple[Checkpoint, int, dict]]:
    """(source checkpoint, source layer, its parameters) of every output layer, checked before any read."""
    opened: dict[Path, Checkpoint] = {}
    layers = []
    for i, sl in enumerate(cfg.slices):
        if len(sl.sources) != 1:
            raise ConfigError(f"slices.{i}.sources: passthrough takes one source per slice, got {len(sl.sources)}")
        src = sl.sources[0]
        path = resolve_path(src.model, cfg, f"slices.{i}.sources.0.model")
        ck = opened.setdefault(path, Checkpoint(path))
        start, end = src.layer_range
        if not 0 <= start < end <= ck.num_layers:
            raise ConfigError(
                f"slices.{i}.sources.0.layer_range: [{start}, {end}] is not a range of the {ck.num_layers} "
                f"layers of {path}"
            )
        params = {**sl.parameters, **src.parameters}
        extra = sorted((set(params) | set(cfg.parameters)) - {"scale"})
        if extra:
            raise ConfigError(f"slices.{i}: unknown parameter {extra[0]!r} for passthrough (allowed: scale)")
        layers += [(ck, j, params) for j in range(start, end)]
    _check_same_layers(layers)
    return layers


def _layer_shapes(ck: Checkpoint, j: int) -> dict[str, tuple]:
    block = next(b for b in ck.blocks() if b.layer == j)
    return {renamed(n, 0): (ck.tensors[n].shape, ck.tensors[n].dtype) for n in block.tensors}


def _check_same_layers(layers: list[tuple[Checkpoint, int, dict]]) -> None:
    ref_ck, ref_j, _ = layers[0]
    ref = _layer_shapes(ref_ck, ref_j)
    for ck, j, _ in layers[1:]:
        got = _layer_shapes(ck, j)
        for name in sorted(set(ref) | set(got)):
            if ref.get(name) != got.get(name):
                raise ConfigError(
                    f"slices: layer {j} of {ck.path} does not match layer {ref_j} of {ref_ck.path} "
                    f"(tensor {renamed(name, j)}: {got.get(name)} vs {ref.get(name)})"
                )


def _sources(layers: list[tuple[Checkpoint, int, dict]]) -> list[tuple[str, Checkpoint, str, dict]]:
    """(output name, checkpoint, source name, parameters) of every output tensor, in block order."""
    first, last = layers[0][0], layers[-1][0]
    blocks = {b.name: b for b in first.blocks()}
    out = [(n, first, n, layers[0][2]) for n in blocks["embed"].tensors] if "embed" in blocks else []
    for i, (ck, j, params) in enumerate(layers):
        block = next(b for b in ck.blocks() if b.layer == j)
        out += [(renamed(n, i), ck, n, params) for n in block.tensors]
    head = next((b for b in last.blocks() if b.name == "head"), None)
    return out + ([(n, last, n, layers[-1][2]) for n in head.tensors] if head else [])


def _output_config(first: Checkpoint, layers: list[tuple[Checkpoint, int, dict]], dtype) -> dict:
    config = dict(first.config)
    config["num_hidden_layers"] = len(layers)
    if isinstance(config.get("layer_types"), list):  # per-layer attention kinds follow their layers
        config["layer_types"] = [ck.config.get("layer_types", [None] * (j + 1))[j] for ck, j, _ in layers]
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        for k in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
            config[k] = name
    return config


def run_frankenmerge(
    cfg: MergeConfig, out: str | Path, *, force: bool, shard_size, dtype, inputs: list, progress: bool
) -> Path:
    layers = plan_layers(cfg)
    out_dtype = parse_dtype(dtype) or parse_dtype(cfg.out_dtype or cfg.dtype)
    sources = _sources(layers)
    plan, scales = [], {}
    for name, ck, src, params in sources:
        info = ck.tensors[src]
        floating = info.dtype.is_floating_point
        plan.append((name, info.shape, out_dtype if (out_dtype is not None and floating) else info.dtype))
        scale = _scale(cfg, params, name, len(layers))
        if scale != 1.0 and not floating:
            raise ConfigError(f"scale: {scale} for tensor {name}, which is not floating point")
        scales[name] = scale
    dtypes = {n: d for n, _, d in plan}
    paths = sorted({str(ck.path) for ck, _, _ in layers})
    record = cfg.model_dump(exclude_none=True, exclude={"source_dir"})
    with CheckpointWriter(out, plan, shard_size=shard_size, force=force, inputs=[*paths, *inputs]) as writer:
        for name, ck, src, _ in sources:
            t = ck.get(src)
            if scales[name] != 1.0:
                t = t.float().mul_(scales[name])
            writer.write(name, t.to(dtypes[name]))
            del t
        config = _output_config(layers[0][0], layers, out_dtype)
        result = writer.finish(layers[0][0].path, extra_json={"config.json": config, "blockmerge_config.json": record})
    if progress:
        print(f"passthrough: wrote {result} ({len(layers)} layers from {len(cfg.slices)} slices)", flush=True)
    return result


def _scale(cfg: MergeConfig, params: dict, tensor: str, num_layers: int) -> float:
    t = layer_t(tensor, num_layers)
    for value in (params.get("scale"), cfg.parameters.get("scale")):
        v = evaluate_setting(value, tensor, t) if value is not None else None
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                raise ConfigError(f"scale: expected a number for tensor {tensor}, got {v!r}")
            return float(v)
    return 1.0


def config_inputs(config) -> list:
    """The YAML file itself when the config was given as a path (it may not be overwritten either)."""
    return [config] if isinstance(config, Path) or (isinstance(config, str) and os.path.isfile(config)) else []
