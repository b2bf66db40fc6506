"""What every kernel backend computes, written once: the arguments of `combine` (one validated, frozen
CombineSpec that the eager, compiled and Triton backends all consume), the input checks, and the DARE
counter hash whose bits every backend must reproduce.

combine:  out = base_weight * base + scale * mix(tau_1..tau_T),   tau_t = expert_t - base
  tau'_t = tau_t * keep_t / (1 - p_t)      DARE: keep_t from a counter-based hash of (seed, t, offset + i)
  tau'_t = tau'_t * (|tau'_t| >= thr_t)    TIES trim: thr_t is the per-task magnitude threshold
  m_t    = sign(tau'_t) == elected sign    TIES sign election over sum_t w_t tau'_t (>= 0 elects +)
  mix    = sum_t w_t m_t tau'_t / (sum_t w_t m_t  if normalize else 1)
project:  g_t = sum_i grad[i] * (expert_t[i] - base[i])      (dLoss/dGamma_t given dLoss/dW)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# 32-bit hash constants (lowbias32 by C. Wellons) and the golden-ratio key mixers.
M1, M2 = 0x7FEB352D, 0x846CA68B
_K1, _K2 = 0x27D4EB2D, 0x165667B1
MASK32 = 0xFFFFFFFF


def task_key(seed: int, task: int) -> int:
    """The 32-bit key of task `task`'s DARE stream: the same on every path."""
    return (seed * _K1 + (task + 1) * _K2) & MASK32


def s32(v: int) -> int:
    """The int32 with the bit pattern of v mod 2^32."""
    v &= MASK32
    return v - (1 << 32) if v >= 1 << 31 else v


def _mul32_(x: torch.Tensor, c: int) -> torch.Tensor:
    # x = (x * c) mod 2^32 in place on int64 (x < 2^32) without overflowing: split c into 16-bit halves.
    lo, hi = c & 0xFFFF, c >> 16
    t = x * hi
    t.bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return x.mul_(lo).add_(t).bitwise_and_(MASK32)


def hash_uniform(key: int, index: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) float32 per element index (int64, < 2^32), counter-based: no state, any order."""
    x = (index & MASK32).bitwise_xor_(key)
    x.bitwise_xor_(x >> 16)
    _mul32_(x, M1)
    x.bitwise_xor_(x >> 15)
    _mul32_(x, M2)
    x.bitwise_xor_(x >> 16)
    return x.bitwise_right_shift_(8).to(torch.float32).mul_(1.0 / (1 << 24))


def dare_keep(seed: int, task: int, p: float, offset: int, numel: int, device="cpu") -> torch.Tensor:
    """Boolean keep-mask of DARE for elements offset .. offset+numel of one task (keep with prob 1-p)."""
    idx = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    return hash_uniform(task_key(seed, task), idx) >= p


def check_experts(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> None:
    """Every expert has the base's shape and device (all kernel paths check the same way)."""
    for e in experts:
        if e.shape != base.shape:
            raise ValueError(f"expert shape {list(e.shape)} != base shape {list(base.shape)}")
        if e.device != base.device:
            raise ValueError(f"expert on {e.device} but base on {base.device}")


def check_project(grad: torch.Tensor, base: torch.Tensor, experts: Sequence[torch.Tensor]) -> None:
    """project's inputs: grad, base and every expert of one shape and device."""
    if grad.shape != base.shape:
        raise ValueError(f"grad shape {list(grad.shape)} != base shape {list(base.shape)}")
    check_experts(base, experts)


def _per_task(x, T: int, name: str) -> tuple[float, ...]:
    if x is None:
        return (0.0,) * T
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().reshape(-1).tolist()
    elif isinstance(x, (int, float)):
        x = [float(x)] * T
    x = tuple(float(v) for v in x)
    if len(x) != T:
        raise ValueError(f"{name}: expected {T} values (one per expert), got {len(x)}")
    return x


@dataclass(frozen=True)
class CombineSpec:
    """The options of one combine call, checked and normalised (per-task tuples of floats, resolved dtype)."""

    weights: tuple[float, ...]
    drop_p: tuple[float, ...]  # DARE drop probability per task (0: no DARE for that task)
    thresholds: tuple[float, ...] | None  # TIES magnitude threshold per task (None: no trim)
    base_weight: float
    scale: float
    rescale: bool  # DARE: divide kept entries by 1 - p
    seed: int
    offset: int  # element offset of this tensor in the DARE counter stream
    sign_consensus: bool
    normalize: bool
    out_dtype: torch.dtype

    @property
    def T(self) -> int:
        return len(self.weights)

    @property
    def dare(self) -> bool:
        return any(v > 0 for v in self.drop_p)

    @property
    def simple(self) -> bool:
        """No DARE, trim, sign election or normalisation: one multiply-add per input."""
        return not self.dare and self.thresholds is None and not self.sign_consensus and not self.normalize

    @property
    def base_coef(self) -> float:
        """In the simple case, base_weight*b + scale*sum w (e - b) = base_coef*b + sum scale*w*e."""
        return self.base_weight - self.scale * sum(self.weights)

    @property
    def div_const(self) -> float:
        """normalize without sign election divides by the sum of the weights (1 when it is ~0)."""
        sw = sum(self.weights)
        return sw if self.normalize and not self.sign_consensus and abs(sw) >= 1e-8 else 1.0

    @property
    def keep_scale(self) -> tuple[float, ...]:
        """What a kept DARE entry is multiplied by: 1 / (1 - p) when rescaling, else 1."""
        return tuple(1.0 / (1.0 - p) if self.rescale and p > 0 else 1.0 for p in self.drop_p)


def combine_spec(
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
) -> CombineSpec:
    """The one signature of combine (every backend's `combine_*(base, experts, weights, **options)`):
    weights, drop_p and thresholds take one value per expert (drop_p also one number for all)."""
    T = len(experts)
    spec = CombineSpec(
        weights=_per_task(weights, T, "weights"),
        drop_p=_per_task(drop_p, T, "drop_p"),
        thresholds=_per_task(thresholds, T, "thresholds") if thresholds is not None else None,
        base_weight=float(base_weight),
        scale=float(scale),
        rescale=bool(rescale),
        seed=int(seed),
        offset=int(offset),
        sign_consensus=bool(sign_consensus) and T > 0,
        normalize=bool(normalize),
        out_dtype=out_dtype or base.dtype,
    )
    check_experts(base, experts)
    return spec
