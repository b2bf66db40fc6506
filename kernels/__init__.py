"""Fused task-vector kernels behind one dispatch point: Triton for CUDA tensors; on CPU the torch formulas
compiled by torch.compile (compiled.py) for tensors of at least compiled.MIN_NUMEL elements, and the eager
torch backend (eager.py) for smaller ones or where torch.compile cannot build. A simple combine (one
multiply-add per input: linear, task_arithmetic) of a big tensor runs eagerly with the compiled kernel's
rounding (eager.combine_simple_rounded: the same bits, no compiler start-up) unless `compiled` is forced,
the compiler is running already or the process has combined EAGER_SIMPLE_BYTES that way.
Every backend takes the same arguments, checked once by spec.combine_spec.
BLOCKMERGE_KERNELS=auto|compiled|torch|triton forces a path (`eager` is accepted for `torch`; triton on CPU
needs TRITON_INTERPRET=1 set before triton is first imported). Inputs are not differentiated through (no
autograd): project gives the gradient with respect to the coefficients."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from . import compiled
from .eager import combine_simple_rounded, combine_torch, magnitude_thresholds, project_torch
from .spec import combine_spec, dare_keep, hash_uniform, task_key

__all__ = [
    "backend",
    "combine",
    "project",
    "combine_torch",
    "combine_simple_rounded",
    "project_torch",
    "compiled",
    "combine_spec",
    "magnitude_thresholds",
    "dare_keep",
    "hash_uniform",
    "task_key",
]


BACKENDS = ("triton", "compiled", "torch")
ALIASES = {"eager": "torch"}  # the eager backend's module name, accepted beside the public `torch`


def _forced() -> str:
    forced = os.environ.get("BLOCKMERGE_KERNELS", "auto").lower()
    return ALIASES.get(forced, forced)


def backend(t: torch.Tensor) -> str:
    """'triton', 'compiled' or 'torch' for a tensor, honouring BLOCKMERGE_KERNELS."""
    forced = _forced()
    if forced in BACKENDS:
        return forced
    if forced != "auto":
        raise ValueError(f"BLOCKMERGE_KERNELS={forced!r}: expected auto, {', '.join(BACKENDS)} or eager")
    if t.is_cuda:
        return "triton"
    return "compiled" if compiled.available() and t.numel() >= compiled.MIN_NUMEL else "torch"


# Simple combines run eagerly (the compiled kernel's bits at about 4x its CPU time per byte, spread over the
# cores, where the start-up runs on one) until this many input bytes in the process, or as soon as the
# compiler has started anyway; a longer linear merge then switches to the compiled loop, whose start-up
# (about 5 CPU-seconds) the rest pays for (benchmarks/README.md: break-even near 9 GB of inputs in CPU time).
EAGER_SIMPLE_BYTES = 16 << 30
_eager_simple_bytes = 0


def _simple_eagerly(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> bool:
    global _eager_simple_bytes
    if compiled.started() or _eager_simple_bytes >= EAGER_SIMPLE_BYTES:
        return False
    _eager_simple_bytes += sum(t.numel() * t.element_size() for t in (base, *experts))
    return True


def combine(base: torch.Tensor, experts: Sequence[torch.Tensor], weights, **kw) -> torch.Tensor:
    """out = base_weight*base + scale*mix(expert_t - base); options as spec.combine_spec."""
    bk = backend(base)
    if bk == "triton":
        from .triton_kernels import combine_triton

        return combine_triton(base, experts, weights, **kw)
    if bk == "compiled":
        spec = combine_spec(base, experts, weights, **kw)
        if spec.simple and _forced() != "compiled" and _simple_eagerly(base, experts):
            return combine_simple_rounded(base, experts, spec)
        return compiled.combine_fused(base, experts, spec)
    return combine_torch(base, experts, weights, **kw)


def project(grad: torch.Tensor, base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """g_t = <grad, expert_t - base> for all tasks in one pass, fp32 [T]."""
    bk = backend(grad)
    if bk == "triton":
        from .triton_kernels import project_triton

        return project_triton(grad, base, experts)
    if bk == "compiled":
        return compiled.project_compiled(grad, base, experts)
    return project_torch(grad, base, experts)
