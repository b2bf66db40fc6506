"""Fused task-vector kernels: one dispatch point choosing Triton for CUDA tensors and the torch
reference elsewhere. BLOCKMERGE_KERNELS=torch|triton forces a path (triton on CPU needs TRITON_INTERPRET=1
set before triton is first imported). The torch path is the CPU implementation (chunked, on a pool of
BLOCKMERGE_CPU_THREADS threads, default torch.get_num_threads()). Inputs are not differentiated through
(no autograd): project gives the gradient with respect to the coefficients."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .reference import combine_torch, dare_keep, hash_uniform, magnitude_thresholds, project_torch, task_key

__all__ = [
    "backend",
    "combine",
    "project",
    "combine_torch",
    "project_torch",
    "magnitude_thresholds",
    "dare_keep",
    "hash_uniform",
    "task_key",
]


def backend(t: torch.Tensor) -> str:
    """'triton' or 'torch' for a tensor, honouring BLOCKMERGE_KERNELS."""
    forced = os.environ.get("BLOCKMERGE_KERNELS", "auto").lower()
    if forced in ("torch", "triton"):
        return forced
    if forced != "auto":
        raise ValueError(f"BLOCKMERGE_KERNELS={forced!r}: expected auto, torch or triton")
    return "triton" if t.is_cuda else "torch"


def combine(base: torch.Tensor, experts: Sequence[torch.Tensor], weights, **kw) -> torch.Tensor:
    """out = base_weight*base + scale*mix(expert_t - base); see reference.py for every option."""
    if backend(base) == "triton":
        from .triton_kernels import combine_triton

        return combine_triton(base, experts, weights, **kw)
    return combine_torch(base, experts, weights, **kw)


def project(grad: torch.Tensor, base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """g_t = <grad, expert_t - base> for all tasks in one pass, fp32 [T]."""
    if backend(grad) == "triton":
        from .triton_kernels import project_triton

        return project_triton(grad, base, experts)
    return project_torch(grad, base, experts)
