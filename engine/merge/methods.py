"""Static merge methods, one tensor at a time (tensor functions of registry.py). All arithmetic goes through
`blockmerge.kernels.combine` (fp32 accumulation inside; output written in `out_dtype`); only TIES thresholds
(kernels' `magnitude_thresholds`) and slerp's two scalars (norms and a dot product) are computed here.

Semantics follow mergekit 0.1.x (generalized_task_arithmetic.py, linear.py, slerp.py, model_stock.py,
nearswap.py, arcee_fusion.py, passthrough.py):
  tau_t = expert_t - base
  task_arithmetic  out = base + lambda * mix,  mix = sum w_t tau_t            (/ sum w_t if normalize)
  ties             tau_t trimmed to its top-k magnitudes (k = int(density * numel)), sign elected from
                   sum_t w_t tau_t (>= 0 elects +), disjoint mean over agreeing experts (normalize: divide by
                   the sum of the agreeing experts' weights, 0 -> 1), then * lambda
  dare_ties        tau_t kept with prob. density (hash RNG, seeded per tensor), / density if rescale,
                   then sign election as ties
  dare_linear      as dare_ties without sign election
  linear           out = sum w_i m_i / sum w_i  (normalize) or sum w_i m_i
  slerp            spherical interpolation between base (t = 0) and the other model (t = 1) on the flattened
                   tensors, lerp when |cos| > 0.9995
  model_stock      base + t * mean_t tau_t, t = N cos / (1 + (N-1) cos), cos the mean pairwise cosine of the
                   task vectors (per row with filter_wise)
  nearswap         base + w * (model - base), w = clamp(t / |base - model|, 0, 1) per entry
  arcee_fusion     the model's entries whose importance is an upper outlier, the base's elsewhere
  passthrough      one model's tensors, each times `scale`
Tensors of non-float dtype (integer buffers) are copied from the first input.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch
from blockmerge.kernels import combine, magnitude_thresholds
from blockmerge.merge.call import TensorCall

DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8
_CHUNK = 1 << 22


def dare_seed(seed: int, tensor: str) -> int:
    """The DARE seed of one tensor: the config/CLI seed mixed with a hash of the tensor's name."""
    return (int(seed) * 0x9E3779B1 + zlib.crc32(tensor.encode())) & 0xFFFFFFFF


def _gta(c: TensorCall, *, sign: bool, **kw) -> torch.Tensor:
    """base + lambda * mix of the task vectors, all in one kernels.combine call."""
    return combine(
        c.base,
        c.models,
        c.each("weight"),
        scale=c.g["lambda"],
        sign_consensus=sign,
        normalize=c.g["normalize"],
        out_dtype=c.out_dtype,
        **kw,
    )


def task_arithmetic(c: TensorCall) -> torch.Tensor:
    return _gta(c, sign=False)


def ties(c: TensorCall) -> torch.Tensor:
    densities = c.each("density")
    kw = {"thresholds": magnitude_thresholds(c.base, c.models, densities)} if any(d < 1.0 for d in densities) else {}
    return _gta(c, sign=True, **kw)


def _dare(c: TensorCall, sign: bool) -> torch.Tensor:
    p = [max(0.0, 1.0 - d) for d in c.each("density")]
    kw = dict(drop_p=p, rescale=c.g["rescale"], seed=dare_seed(c.g["seed"], c.name), offset=0) if any(p) else {}
    return _gta(c, sign=sign, **kw)


def dare_ties(c: TensorCall) -> torch.Tensor:
    return _dare(c, sign=True)


def dare_linear(c: TensorCall) -> torch.Tensor:
    return _dare(c, sign=False)


def linear_merge(c: TensorCall) -> torch.Tensor:
    return linear(c.models, c.each("weight"), normalize=c.g["normalize"], out_dtype=c.out_dtype)


def slerp_merge(c: TensorCall) -> torch.Tensor:
    return slerp(c.g["t"], c.base, c.models[0], out_dtype=c.out_dtype)


def linear(
    models: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True, out_dtype=None
) -> torch.Tensor:
    """sum w_i m_i (/ sum w_i): written as m_0 + sum_{i>0} (w_i/W) (m_i - m_0) with base_weight S/W."""
    total = float(sum(weights))
    div = total if normalize and abs(total) >= 1e-8 else 1.0
    if normalize and abs(total) < 1e-8:
        raise ValueError("linear: weights sum to 0, cannot normalize")
    return combine(
        models[0],
        list(models[1:]),
        [w / div for w in weights[1:]],
        base_weight=total / div,
        out_dtype=out_dtype,
    )


def _norms_and_dot(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """||a||, ||b||, <a, b> in float64 accumulation over fp32 chunks (no full-size temporaries)."""
    af, bf = a.reshape(-1), b.reshape(-1)
    na = nb = dot = 0.0
    for s in range(0, af.numel(), _CHUNK):
        x, y = af[s : s + _CHUNK].double(), bf[s : s + _CHUNK].double()
        na += float(torch.dot(x, x))
        nb += float(torch.dot(y, y))
        dot += float(torch.dot(x, y))
    return math.sqrt(na), math.sqrt(nb), dot


def slerp_scalars(t: float, v0: torch.Tensor, v1: torch.Tensor) -> tuple[float, float]:
    """(s0, s1) with slerp(t, v0, v1) = s0 * v0 + s1 * v1 (mergekit's slerp on the flattened tensors)."""
    n0, n1, dot = _norms_and_dot(v0, v1)
    # mergekit normalises each copy only when its norm exceeds eps
    d0 = n0 if n0 > SLERP_EPS else 1.0
    d1 = n1 if n1 > SLERP_EPS else 1.0
    cos = dot / (d0 * d1)
    if abs(cos) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta0 = math.acos(cos)
    sin0 = math.sin(theta0)
    theta_t = theta0 * t
    return math.sin(theta0 - theta_t) / sin0, math.sin(theta_t) / sin0


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, out_dtype=None) -> torch.Tensor:
    s0, s1 = slerp_scalars(t, v0, v1)
    # combine: base_weight*v0 + w*(v1 - v0) = s0*v0 + s1*v1 with base_weight = s0 + s1, w = s1
    return combine(v0, [v1], [s1], base_weight=s0 + s1, out_dtype=out_dtype)


def model_stock(c: TensorCall) -> torch.Tensor:
    """Model Stock (arXiv 2403.19522): out = t * mean(models) + (1 - t) * base with t = N cos / (1 + (N-1) cos),
    cos the mean pairwise cosine between task vectors: over the whole tensor (one t, through kernels.combine),
    or per row with filter_wise (a 1-D tensor is one row)."""
    n = len(c.models)
    if not c.g["filter_wise"]:
        taus = [m.float() - c.base.float() for m in c.models]
        cos = sum(_cosine(taus[i], taus[j]) for i in range(n) for j in range(i + 1, n)) / (n * (n - 1) // 2)
        t = n * cos / (1 + (n - 1) * cos)
        return combine(c.base, c.models, [t / n] * n, out_dtype=c.out_dtype)
    b = c.base.float().reshape(1, -1) if c.base.dim() < 2 else c.base.float().reshape(c.base.shape[0], -1)
    taus = [m.float().reshape(b.shape) - b for m in c.models]
    pairs = [_cosine(taus[i], taus[j], dim=-1) for i in range(n) for j in range(i + 1, n)]
    cos = torch.stack(pairs).mean(0).unsqueeze(-1)
    t = n * cos / (1 + (n - 1) * cos)
    return (b + t * torch.stack(taus).mean(0)).view(c.base.shape).to(c.out_dtype)


def _cosine(a: torch.Tensor, b: torch.Tensor, dim: int | None = None):
    """mergekit's cosine: <a, b> / max(|a||b|, 1e-6), clamped to [-1, 1]; a float, or per row with dim."""
    if dim is None:
        na, nb, dot = _norms_and_dot(a, b)
        return max(-1.0, min(1.0, dot / max(na * nb, 1e-6)))
    return ((a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim)).clamp(min=1e-6)).clamp(-1.0, 1.0)


def nearswap(c: TensorCall) -> torch.Tensor:
    """base moved towards the other model where they are close: w = clamp(t / |base - model|, 0, 1) per entry
    (1 where they are equal), out = base + w * (model - base)."""
    b, e = c.base.float(), c.models[0].float()
    w = (c.g["t"] / (b - e).abs()).nan_to_num_(nan=1.0, posinf=1.0).clamp_(0.0, 1.0)
    return torch.lerp(b, e, w).to(c.out_dtype)


def arcee_fusion(c: TensorCall) -> torch.Tensor:
    """The other model's entries where they matter: importance = |model - base| * KL(softmax(model) ||
    softmax(base)) of the entry's row (last dimension); entries with importance >= median + 1.5 IQR (quantiles
    at index int(q * (n - 1)) of the sorted importances) take the model's value, the rest the base's."""
    b, m = c.base.float(), c.models[0].float()
    importance = (m - b).abs().mul_(_row_kl(m, b))
    ranked = importance.reshape(-1).sort().values
    q1, median, q3 = (ranked[int(f * (ranked.numel() - 1))] for f in (0.25, 0.5, 0.75))
    keep = importance >= median + 1.5 * (q3 - q1)
    return torch.where(keep, m, b).to(c.out_dtype)


def _row_kl(m: torch.Tensor, b: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """KL(softmax(m) + 1e-8 || softmax(b) + 1e-8) of every row (last dimension), [..., 1] fp32: computed in
    float64 a slab of rows at a time (in fp32 the small KLs lose about three digits to cancellation)."""
    m2, b2 = m.reshape(-1, m.shape[-1]), b.reshape(-1, b.shape[-1])
    out = torch.empty(m2.shape[0], 1, dtype=torch.float32)
    for s in range(0, m2.shape[0], rows):
        p = torch.softmax(m2[s : s + rows].double(), dim=-1) + 1e-8
        q = torch.softmax(b2[s : s + rows].double(), dim=-1) + 1e-8
        out[s : s + rows] = (p * (p / q).log()).sum(-1, keepdim=True)
    return out.view(*m.shape[:-1], 1)


def passthrough(c: TensorCall) -> torch.Tensor:
    """The one model's tensor, times its `scale`."""
    return linear(c.models, c.each("scale"), normalize=False, out_dtype=c.out_dtype)
