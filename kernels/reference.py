"""Torch reference of the task-vector kernels. It defines the semantics the Triton kernels must match,
and it is the CPU implementation: it works in chunks so the fp32 temporaries stay in cache.

combine:  out = base_weight * base + scale * mix(tau_1..tau_T),   tau_t = expert_t - base
  tau'_t = tau_t * keep_t / (1 - p_t)      DARE: keep_t from a counter-based hash of (seed, t, offset + i)
  tau'_t = tau'_t * (|tau'_t| >= thr_t)    TIES trim: thr_t is the per-task magnitude threshold
  m_t    = sign(tau'_t) == elected sign    TIES sign election over sum_t w_t tau'_t (>= 0 elects +)
  mix    = sum_t w_t m_t tau'_t / (sum_t w_t m_t  if normalize else 1)
project:  g_t = sum_i grad[i] * (expert_t[i] - base[i])      (dLoss/dGamma_t given dLoss/dW)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CHUNK = 1 << 18  # elements per chunk: a few fp32 temporaries of this size fit in L2

# 32-bit hash constants (lowbias32 by C. Wellons) and the golden-ratio key mixers.
_M1, _M2 = 0x7FEB352D, 0x846CA68B
_K1, _K2 = 0x27D4EB2D, 0x165667B1
_MASK32 = 0xFFFFFFFF


def task_key(seed: int, task: int) -> int:
    """The 32-bit key of task `task`'s DARE stream: the same on every path."""
    return (seed * _K1 + (task + 1) * _K2) & _MASK32


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 on int64 without overflowing: split c into 16-bit halves.
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def hash_uniform(key: int, index: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) float32 per element index (int64, < 2^32), counter-based: no state, any order."""
    x = (index & _MASK32) ^ key
    x = x ^ (x >> 16)
    x = _mul32(x, _M1)
    x = x ^ (x >> 15)
    x = _mul32(x, _M2)
    x = x ^ (x >> 16)
    return (x >> 8).to(torch.float32) * (1.0 / (1 << 24))


def dare_keep(seed: int, task: int, p: float, offset: int, numel: int, device="cpu") -> torch.Tensor:
    """Boolean keep-mask of DARE for elements offset .. offset+numel of one task (keep with prob 1-p)."""
    idx = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    return hash_uniform(task_key(seed, task), idx) >= p


def magnitude_thresholds(base: torch.Tensor, experts: Sequence[torch.Tensor], density: Sequence[float]) -> list[float]:
    """Per-task TIES threshold: the k-th largest |tau_t| with k = int(density * numel) (mergekit's top-k);
    keeping |tau| >= threshold keeps the top k (ties at the threshold aside)."""
    out = []
    n = base.numel()
    for e, d in zip(experts, density, strict=True):
        k = int(d * n)
        if k >= n:
            out.append(0.0)
        elif k <= 0:
            out.append(float("inf"))
        else:
            mag = (e.reshape(-1).float() - base.reshape(-1).float()).abs_()
            out.append(float(torch.kthvalue(mag, n - k + 1).values))
    return out


def _as_list(x, T: int, name: str) -> list[float]:
    if x is None:
        return [0.0] * T
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().reshape(-1).tolist()
    elif isinstance(x, (int, float)):
        x = [float(x)] * T
    x = [float(v) for v in x]
    if len(x) != T:
        raise ValueError(f"{name}: expected {T} values (one per expert), got {len(x)}")
    return x


def combine_torch(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    *,
    base_weight: float = 1.0,
    scale: float = 1.0,
    drop_p: Sequence[float] | float | None = None,
    rescale: bool = True,
    seed: int = 0,
    offset: int = 0,
    thresholds: Sequence[float] | None = None,
    sign_consensus: bool = False,
    normalize: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    T = len(experts)
    w = _as_list(weights, T, "weights")
    p = _as_list(drop_p, T, "drop_p")
    thr = _as_list(thresholds, T, "thresholds") if thresholds is not None else None
    for e in experts:
        if e.shape != base.shape:
            raise ValueError(f"expert shape {list(e.shape)} != base shape {list(base.shape)}")
    out = torch.empty(base.shape, dtype=out_dtype or base.dtype, device=base.device)
    b_flat, o_flat = base.reshape(-1), out.view(-1)
    e_flat = [e.reshape(-1) for e in experts]
    simple = not any(p) and thr is None and not sign_consensus and not normalize
    for s in range(0, base.numel(), CHUNK):
        sl = slice(s, min(s + CHUNK, base.numel()))
        b = b_flat[sl].float()
        if simple:
            # base_weight*b + scale*sum w (e - b) = (base_weight - scale*sum w)*b + sum scale*w*e: one pass per input
            acc = b * (base_weight - scale * sum(w))
            for e, wt in zip(e_flat, w, strict=True):
                acc.add_(e[sl].float(), alpha=scale * wt)
            o_flat[sl] = acc
            continue
        taus = []
        for t, e in enumerate(e_flat):
            tau = e[sl].float() - b
            if p[t] > 0:
                keep = dare_keep(seed, t, p[t], offset + s, tau.numel(), tau.device)
                tau = torch.where(keep, tau / (1.0 - p[t]) if rescale else tau, torch.zeros_like(tau))
            if thr is not None:
                tau = torch.where(tau.abs() >= thr[t], tau, torch.zeros_like(tau))
            taus.append(tau)
        wts = [tau * wt for tau, wt in zip(taus, w, strict=True)]
        if sign_consensus:
            elected = torch.where(sum(wts) >= 0, 1.0, -1.0)
            agree = [(torch.sign(tau * wt) == elected) for tau, wt in zip(taus, w, strict=True)]
            mix = sum(torch.where(a, x, 0.0) for a, x in zip(agree, wts, strict=True))
            div = sum(a.float() * wt for a, wt in zip(agree, w, strict=True))
            div = torch.where(div == 0, 1.0, div)
        else:
            mix = sum(wts)
            div = sum(w) if abs(sum(w)) >= 1e-8 else 1.0
        if normalize:
            mix = mix / div
        o_flat[sl] = b * base_weight + scale * mix
    return out


def project_torch(grad: torch.Tensor, base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """g_t = <grad, expert_t - base> for every task, fp32, shape [T]."""
    g = torch.zeros(len(experts), dtype=torch.float32, device=grad.device)
    gf, bf = grad.reshape(-1), base.reshape(-1)
    ef = [e.reshape(-1) for e in experts]
    for s in range(0, gf.numel(), CHUNK):
        sl = slice(s, min(s + CHUNK, gf.numel()))
        gc, b = gf[sl].float(), bf[sl].float()
        for t, e in enumerate(ef):
            g[t] += torch.dot(gc, e[sl].float() - b)  # difference first: <g,e> - <g,b> cancels badly
    return g
