"""Spherical merges of 2+ models (mergekit's multislerp, nuslerp, karcher). Each is a weighted sum of its
inputs whose coefficients follow from the inputs' norms and inner products, so a tensor is read once for its
Gram matrix (float64 sums over fp32 chunks), the coefficients are found on T x T numbers, and the output is
one `kernels.combine` pass. The points are the models, or with a base the task vectors (model - base), the
result then added to the base.

  multislerp  u_i = x_i / (|x_i| + eps), w normalised to sum 1 (normalize_weights); m = sum w_i u_i; the
              tangent-space mean of the u_i at m/|m| is m/|m| itself (the weighted tangent vectors sum to 0), so
              out = m/|m| * sum w_i |x_i|; |m| < eps: two models are averaged linearly, more are an error
  nuslerp     t = w_1 / (w_0 + w_1) (0.5 when the sum is ~0); slerp(t, x_0, x_1) on the flattened tensors
              (nuslerp_flatten), else per vector along the last dimension (the first with nuslerp_row_wise);
              lerp where |sin theta| < 1e-8
  karcher     the Riemannian mean on the unit sphere of the u_i (equal weights), by mergekit's fixed-point
              iteration (max_iter, tol), scaled by the mean norm; it stays in the span of the u_i, so it is
              iterated on the coefficients
"""

from __future__ import annotations

import math

import torch
from blockmerge.kernels import combine
from blockmerge.merge.call import TensorCall
from blockmerge.merge.methods import linear

_CHUNK = 1 << 20


def points(c: TensorCall) -> list[torch.Tensor]:
    """Flat fp32 views of what is interpolated: the models, or their task vectors when there is a base."""
    if c.base is None:
        return [m.reshape(-1) for m in c.models]
    b = c.base.float().reshape(-1)
    return [m.float().reshape(-1) - b for m in c.models]


def gram(xs: list[torch.Tensor]) -> torch.Tensor:
    """<x_i, x_j> in float64, summed over fp32 chunks in a fixed order."""
    g = torch.zeros(len(xs), len(xs), dtype=torch.float64)
    for s in range(0, xs[0].numel(), _CHUNK):
        x = torch.stack([v[s : s + _CHUNK].double() for v in xs])
        g += (x @ x.T).cpu()
    return g


def weighted_sum(c: TensorCall, coefs: list[float]) -> torch.Tensor:
    """sum_i coefs_i x_i over the points, plus the base when there is one (one kernels.combine pass)."""
    if c.base is not None:
        return combine(c.base, c.models, coefs, out_dtype=c.out_dtype)
    return linear(c.models, coefs, normalize=False, out_dtype=c.out_dtype)


def multislerp(c: TensorCall) -> torch.Tensor:
    w = torch.tensor(c.each("weight"), dtype=torch.float64)
    if c.g["normalize_weights"]:
        w = w / w.sum()
    g = gram(points(c))
    norms = g.diag().sqrt()
    a = w / (norms + c.g["eps"])  # m = sum a_i x_i
    m_norm = float(a @ g @ a) ** 0.5
    if m_norm < c.g["eps"]:
        if len(c.models) == 2:
            return weighted_sum(c, w.tolist())
        raise ValueError(f"multislerp: the weighted mean of the unit vectors of tensor {c.name} is zero")
    return weighted_sum(c, (a * float(w @ norms) / m_norm).tolist())


def nuslerp(c: TensorCall) -> torch.Tensor:
    w0, w1 = c.each("weight")
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    if not c.g["nuslerp_flatten"]:
        return _nuslerp_vectors(c, t)
    g = gram(points(c))
    n0, n1 = (max(float(v) ** 0.5, 1e-7) for v in g.diag())
    theta = math.acos(max(-1.0, min(1.0, float(g[0, 1]) / (n0 * n1))))
    s = math.sin(theta)
    coefs = [1 - t, t] if abs(s) < 1e-8 else [math.sin((1 - t) * theta) / s, math.sin(t * theta) / s]
    return weighted_sum(c, coefs)


def _nuslerp_vectors(c: TensorCall, t: float) -> torch.Tensor:
    """slerp of every vector along one dimension (per row or per column), in fp32."""
    dim = 0 if c.g["nuslerp_row_wise"] else -1
    b = None if c.base is None else c.base.float()
    v0, v1 = (m.float() if b is None else m.float() - b for m in c.models)
    v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    theta = torch.acos((u0 * u1).sum(-1, keepdim=True).clamp(-1, 1))
    s = torch.sin(theta)
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / s
    out = torch.where(s.abs() < 1e-8, (1 - t) * v0 + t * v1, out).transpose(dim, -1)
    return (out if b is None else out + b).to(c.out_dtype)


def karcher(c: TensorCall) -> torch.Tensor:
    g = gram(points(c))
    n, tol = len(c.models), c.g["tol"]
    norms = g.diag().sqrt()
    valid = [i for i in range(n) if float(norms[i]) > tol]
    if not valid:
        return weighted_sum(c, [0.0] * n)
    nv = norms[valid]
    gu = g[valid][:, valid] / torch.outer(nv, nv)  # Gram matrix of the unit vectors
    alpha = torch.full((len(valid),), 1.0 / len(valid), dtype=torch.float64)
    mean, norm = _unit(alpha, gu)  # coefficients of the mean over the unit vectors
    if norm < tol:  # the unit vectors cancel: start from the first
        mean = torch.zeros_like(alpha)
        mean[0] = 1.0
    for _ in range(int(c.g["max_iter"])):
        dots = (gu @ mean).clamp(-1.0, 1.0)
        tangent = torch.zeros_like(mean)
        for j, d in enumerate(dots.tolist()):
            theta = math.acos(d)
            if theta >= tol:
                step = -d * mean
                step[j] += 1.0
                tangent += alpha[j] * theta / math.sin(theta) * step
        t_norm = float(tangent @ gu @ tangent) ** 0.5
        if t_norm < tol:
            break
        mean = math.cos(t_norm) * mean + math.sin(t_norm) * tangent / t_norm
        unit, norm = _unit(mean, gu)
        mean = unit if norm > tol else mean
    scale = float(norms.sum()) / n
    coefs = [0.0] * n
    for k, i in enumerate(valid):
        coefs[i] = scale * float(mean[k]) / float(norms[i])
    return weighted_sum(c, coefs)


def _unit(coef: torch.Tensor, gu: torch.Tensor) -> tuple[torch.Tensor, float]:
    """coef scaled so that sum_i coef_i u_i has norm 1, and that norm before scaling."""
    norm = float(coef @ gu @ coef) ** 0.5
    return (coef / norm if norm > 0 else coef), norm
