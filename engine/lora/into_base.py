"""Merge LoRA adapters into their base: a full checkpoint W0 + sum_t w_t s_t B_t A_t, streamed block by block."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from blockmerge.io.checkpoint import Checkpoint, block_name
from blockmerge.lora.adapter import AdapterError, LoraModule, read_adapters
from blockmerge.merge.run import stream_merge


def merge_into_base(
    base_dir: str | Path,
    adapter_paths: Sequence[str | Path],
    weights: Sequence[float] | None,
    out: str | Path,
    *,
    force: bool = False,
    shard_size: str = "5GB",
    dtype: torch.dtype | None = None,
    device: str | None = None,
    progress: bool = True,
    coefficients: torch.Tensor | None = None,
    extra_json: dict[str, dict] | None = None,
) -> Path:
    """Full checkpoint W0 + sum_t w_t s_t B_t A_t per adapted weight, streamed block by block; one
    module's delta is formed at a time (one matmul over the concatenated factors). `coefficients`
    [T, n_blocks] (base block order) gives a weight per adapter and block instead of `weights`."""
    base = Checkpoint(base_dir)
    adapters, names = read_adapters(adapter_paths, base, base_given=True)
    T = len(adapters)
    weights = [1.0] * T if weights is None else [float(w) for w in weights]
    if len(weights) != T:
        raise AdapterError(f"--weights: expected {T} values (one per adapter), got {len(weights)}")
    if any(not math.isfinite(w) for w in weights):
        raise AdapterError(f"--weights: {weights} must be finite numbers")
    block_index = {b.name: i for i, b in enumerate(base.blocks())}
    if coefficients is not None:
        coefficients = torch.as_tensor(coefficients, dtype=torch.float64).detach().cpu()
        if tuple(coefficients.shape) != (T, len(block_index)):
            raise AdapterError(
                f"coefficients: shape {list(coefficients.shape)}, expected [{T}, {len(block_index)}] "
                "(adapters x blocks)"
            )
        if not bool(torch.isfinite(coefficients).all()):
            raise AdapterError("coefficients: NaN or Inf values")
    by_tensor: dict[str, list[tuple[LoraModule, float]]] = {}
    for t, (a, w) in enumerate(zip(adapters, weights, strict=True)):
        for mod, m in a.modules.items():
            tname = names[mod]
            if coefficients is not None:
                w = float(coefficients[t, block_index[block_name(tname)]])
            by_tensor.setdefault(tname, []).append((m, w))

    def merge_tensor(name: str, w0: torch.Tensor, _experts: list[torch.Tensor]) -> torch.Tensor:
        terms = by_tensor.get(name)
        if not terms:
            return w0
        dev = w0.device
        A = torch.cat([m.A.to(dev, torch.float32) for m, _ in terms])
        B = torch.cat([m.B.to(dev, torch.float32) * (w * m.scale) for m, w in terms], dim=1)
        acc = w0.to(torch.float32, copy=True)
        if terms[0][0].fan_in_fan_out:
            acc.addmm_(A.T, B.T)
        else:
            acc.addmm_(B, A)
        return acc.to(w0.dtype if dtype is None else dtype)

    info = {
        "blockmerge_lora": {
            "base": str(base_dir),
            "adapters": [str(p) for p in adapter_paths],
            "weights": weights if coefficients is None else None,
            "scales": [sorted({m.scale for m in a.modules.values()}) for a in adapters],
        }
    }
    return stream_merge(
        base,
        [],
        out,
        merge_tensor,
        force=force,
        shard_size=shard_size,
        dtype=dtype,
        device=device,
        progress=progress,
        extra_json={"blockmerge_lora.json": info, **(extra_json or {})},
        desc="lora merge-into-base",
        inputs=adapter_paths,
    )
