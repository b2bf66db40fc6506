"""Fused Triton kernels for combine and project (arguments and semantics: kernels/spec.py).

combine: one pass over base and all experts per launch; everything in fp32 registers (loads cast to fp32);
DARE keep-masks from the same lowbias32 counter hash as spec.hash_uniform (keys computed on the host);
TIES trim with per-task thresholds (computed once per tensor, by eager.magnitude_thresholds) and sign
election from running sums (S, S+, S-, W+, W-), so any number of tasks needs O(1) registers.
Up to MAX_T experts go in one launch (tuple-of-pointers argument, T a constexpr); more experts are done in
groups of MAX_T that carry the running sums through an fp32 scratch buffer ([1 or 5, n]) between launches,
so every option (TIES and normalize included) works for any T, each input still read once.

project: one pass over grad, base and the experts of a group; each program writes fp32 partial sums [T]
for its block, and the partials are summed in a fixed order on the host side (fp64): deterministic.

On CPU tensors these kernels only run under TRITON_INTERPRET=1 (tests); set it before this module is
imported. Weights etc. may be python numbers, lists or tensors (they are read once on the host).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .spec import M1, M2, CombineSpec, check_experts, check_project, combine_spec, s32, task_key

MAX_T = 8  # experts per launch
BLOCK_COMBINE = 1024
BLOCK_PROJECT = 2048
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_M1, _M2 = tl.constexpr(M1), tl.constexpr(M2)  # jit code reads globals only as constexpr


@triton.jit
def _hash_uniform(key, idx):
    """spec.hash_uniform: lowbias32 of (idx mod 2^32) ^ key, top 24 bits as a float in [0, 1)."""
    x = idx.to(tl.uint32) ^ key
    x = x ^ (x >> 16)
    x = x * tl.full([], _M1, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], _M2, tl.uint32)
    x = x ^ (x >> 16)
    return (x >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _combine_kernel(
    base_ptr,
    e_ptrs,  # tuple of T expert pointers
    out_ptr,
    acc_ptr,  # fp32 [NACC, n] running sums between expert groups (unused when FIRST and LAST)
    par_ptr,  # fp32 [4, T]: weight, drop p, 1 - p, threshold
    key_ptr,  # int32 [T]: DARE keys (uint32 bit patterns)
    n,
    offset,  # element offset of this tensor in the DARE counter stream
    base_weight,
    scale,
    div_const,  # normalize divisor without sign election (sum of weights, or 1)
    T: tl.constexpr,
    DARE: tl.constexpr,
    RESCALE: tl.constexpr,
    TRIM: tl.constexpr,
    SIGN: tl.constexpr,
    NORMALIZE: tl.constexpr,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if FIRST:
        s = tl.zeros([BLOCK], tl.float32)  # sum_t w_t tau'_t (task order)
        sp = tl.zeros([BLOCK], tl.float32)  # ... of the positive terms
        sn = tl.zeros([BLOCK], tl.float32)  # ... of the negative terms
        wp = tl.zeros([BLOCK], tl.float32)  # sum of w_t where w_t tau'_t > 0
        wn = tl.zeros([BLOCK], tl.float32)  # sum of w_t where w_t tau'_t < 0
    else:
        s = tl.load(acc_ptr + offs, mask=mask, other=0.0)
        if SIGN:
            sp = tl.load(acc_ptr + n + offs, mask=mask, other=0.0)
            sn = tl.load(acc_ptr + 2 * n + offs, mask=mask, other=0.0)
            wp = tl.load(acc_ptr + 3 * n + offs, mask=mask, other=0.0)
            wn = tl.load(acc_ptr + 4 * n + offs, mask=mask, other=0.0)
        else:
            sp = s
            sn = s
            wp = s
            wn = s
    for t in tl.static_range(T):
        e = tl.load(e_ptrs[t] + offs, mask=mask, other=0.0).to(tl.float32)
        tau = e - b
        w = tl.load(par_ptr + t)
        if DARE:
            p = tl.load(par_ptr + T + t)
            key = tl.load(key_ptr + t).to(tl.uint32, bitcast=True)
            keep = _hash_uniform(key, offs + offset) >= p
            if RESCALE:
                tau = tau / tl.load(par_ptr + 2 * T + t)
            tau = tl.where(keep, tau, 0.0)
        if TRIM:
            thr = tl.load(par_ptr + 3 * T + t)
            tau = tl.where(tl.abs(tau) >= thr, tau, 0.0)
        x = tau * w
        s += x
        if SIGN:
            sp += tl.where(x > 0, x, 0.0)
            sn += tl.where(x < 0, x, 0.0)
            if NORMALIZE:
                wp += tl.where(x > 0, w, 0.0)
                wn += tl.where(x < 0, w, 0.0)
    if LAST:
        if SIGN:
            elected = s >= 0
            mix = tl.where(elected, sp, sn)
            if NORMALIZE:
                div = tl.where(elected, wp, wn)
                div = tl.where(div == 0, 1.0, div)
                mix = mix / div
        else:
            mix = s
            if NORMALIZE:
                mix = mix / div_const
        res = b * base_weight + scale * mix
        tl.store(out_ptr + offs, res.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(acc_ptr + offs, s, mask=mask)
        if SIGN:
            tl.store(acc_ptr + n + offs, sp, mask=mask)
            tl.store(acc_ptr + 2 * n + offs, sn, mask=mask)
            tl.store(acc_ptr + 3 * n + offs, wp, mask=mask)
            tl.store(acc_ptr + 4 * n + offs, wn, mask=mask)


@triton.jit
def _project_kernel(
    grad_ptr,
    base_ptr,
    e_ptrs,  # tuple of T expert pointers
    part_ptr,  # fp32 [n_programs, TP]
    n,
    T: tl.constexpr,
    TP: tl.constexpr,  # T rounded up to a power of two
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    slots = tl.arange(0, TP)
    acc = tl.zeros([TP], tl.float32)
    for t in tl.static_range(T):
        e = tl.load(e_ptrs[t] + offs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.where(slots == t, tl.sum(g * (e - b), axis=0), 0.0)
    tl.store(part_ptr + pid * TP + slots, acc)


def _check(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> None:
    check_experts(base, experts)
    if base.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before importing "
            "blockmerge.kernels.triton_kernels); use BLOCKMERGE_KERNELS=torch for the CPU path"
        )


def combine_triton(base: torch.Tensor, experts: Sequence[torch.Tensor], weights, **options) -> torch.Tensor:
    """Fused combine; options and semantics as spec.combine_spec."""
    spec = combine_spec(base, experts, weights, **options)
    _check(base, experts)
    out = torch.empty(base.shape, dtype=spec.out_dtype, device=base.device)
    if base.numel() == 0:
        return out
    if spec.T == 0:  # no task vectors: out = base_weight * base
        return out.copy_(base.float().mul_(spec.base_weight))
    _launch_combine(base.contiguous(), [e.contiguous() for e in experts], spec, out)
    return out


def _launch_combine(b: torch.Tensor, es: list[torch.Tensor], spec: CombineSpec, out: torch.Tensor) -> None:
    """One launch per group of MAX_T experts, the running sums carried between groups in an fp32 buffer."""
    T, n, dev = spec.T, b.numel(), b.device
    thr = spec.thresholds or (0.0,) * T
    groups = [range(i, min(i + MAX_T, T)) for i in range(0, T, MAX_T)]
    acc = None
    if len(groups) > 1:
        acc = torch.empty((5 if spec.sign_consensus else 1) * n, dtype=torch.float32, device=dev)
    grid = (triton.cdiv(n, BLOCK_COMBINE),)
    for gi, g in enumerate(groups):
        idx = list(g)
        par = [spec.weights[i] for i in idx] + [spec.drop_p[i] for i in idx]
        par += [1.0 - spec.drop_p[i] for i in idx] + [thr[i] for i in idx]
        par_t = torch.tensor(par, dtype=torch.float32).to(dev, non_blocking=True)
        keys_t = torch.tensor([s32(task_key(spec.seed, i)) for i in idx], dtype=torch.int32).to(dev, non_blocking=True)
        _combine_kernel[grid](
            b, tuple(es[i] for i in idx), out, acc if acc is not None else out, par_t, keys_t, n, spec.offset,
            spec.base_weight, spec.scale, spec.div_const,
            T=len(idx), DARE=spec.dare, RESCALE=spec.rescale, TRIM=spec.thresholds is not None,
            SIGN=spec.sign_consensus, NORMALIZE=spec.normalize, FIRST=gi == 0, LAST=gi == len(groups) - 1,
            BLOCK=BLOCK_COMBINE,
        )  # fmt: skip


def project_triton(grad: torch.Tensor, base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """g_t = <grad, expert_t - base> for every task, fp32 [T]; see eager.project_torch."""
    check_project(grad, base, experts)
    _check(base, experts)
    T = len(experts)
    n = grad.numel()
    dev = grad.device
    if T == 0 or n == 0:
        return torch.zeros(T, dtype=torch.float32, device=dev)
    g, b = grad.contiguous(), base.contiguous()
    es = [e.contiguous() for e in experts]
    nprog = triton.cdiv(n, BLOCK_PROJECT)
    outs = []
    for i in range(0, T, MAX_T):
        idx = list(range(i, min(i + MAX_T, T)))
        tp = triton.next_power_of_2(len(idx))
        part = torch.empty(nprog, tp, dtype=torch.float32, device=dev)
        _project_kernel[(nprog,)](g, b, tuple(es[j] for j in idx), part, n, T=len(idx), TP=tp, BLOCK=BLOCK_PROJECT)
        outs.append(part[:, : len(idx)].double().sum(0))
    return torch.cat(outs).float()
