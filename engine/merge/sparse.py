"""Task-vector methods whose sparsification the fused kernels do not express (a per-element rank or keep
probability, a variance selection): the task vectors are sparsified here in fp32, one tensor at a time, and
mixed by `blockmerge.kernels.combine` on a zero base (weights, sign election, normalisation, lambda), so the
mixing is the one every other task-vector method uses.

Semantics follow mergekit (sparsify.py magnitude_outliers / della_magprune, sce.py):
  breadcrumbs   per task vector, of its n entries ranked by |tau|: drop the int(gamma*n) largest and the
                smallest, keeping int(density*n) (fewer largest dropped when gamma > 1 - density); rescale:
                multiply the kept entries by ||tau||_1 / ||kept||_1; then mixed as task_arithmetic (normalize
                false) or, breadcrumbs_ties, with sign election
  della         per row (a 1-D tensor is one row), keep probability linear in the rank of |tau| from
                density - epsilon (smallest) to density + epsilon (largest); rescale: as mergekit, the kept
                entries times ||tau||_1 / ||kept||_1 (not DELLA's 1 / keep probability per entry: the larger
                entries, kept more often, are not scaled down), then mixed with
                sign election (della) or without (della_linear); the keep draws come from the counter hash of
                the kernels (seed, tensor name, task, element index): the same on every device
  sce           positions whose variance over the task vectors is in the top select_topk fraction (of the
                positions with non-zero variance) are kept; each task vector's weight is its mean square,
                normalised over the tasks; sign elected from the unweighted sum; out = base + sum_t w_t m_t tau_t
                / sum_t w_t m_t (0 -> 1)
  ram           entries with |tau_t| > epsilon count as changed by t; out = base + sum_t of the changed entries
                / the number of models changing that entry (arXiv 2601.13572)
  ramplus_tl    as ram, with each model's entries that only it changes scaled by 1 + r * clamp(rho_t, 0, alpha),
                rho_t = (its entries also changed by others) / (its entries only it changes)
mergekit drops every entry when int(gamma*n) is 0 (an empty slice); here none of the largest is dropped then.
"""

from __future__ import annotations

import torch
from blockmerge.kernels import combine, hash_uniform, task_key
from blockmerge.merge.call import TensorCall
from blockmerge.merge.methods import dare_seed


def task_vectors(c: TensorCall) -> list[torch.Tensor]:
    b = c.base.float()
    return [m.float() - b for m in c.models]


def mix(c: TensorCall, taus: list[torch.Tensor], sign: bool) -> torch.Tensor:
    """base + lambda * mix(taus) (weights, sign election, normalize) by kernels.combine on a zero base."""
    mixed = combine(
        torch.zeros_like(taus[0]),
        taus,
        c.each("weight"),
        base_weight=0.0,
        scale=c.g["lambda"],
        sign_consensus=sign,
        normalize=c.g["normalize"],
        out_dtype=torch.float32,
    )
    return mixed.add_(c.base).to(c.out_dtype)


def outlier_trim(tau: torch.Tensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    """Model Breadcrumbs: keep the int(density*n) entries ranked just below the int(gamma*n) largest |tau|."""
    if density >= 1.0:
        return tau
    n = tau.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = n - keep - top
    if bottom < 0:  # too few left: drop fewer of the largest
        top, bottom = top + bottom, 0
    flat = tau.reshape(-1)
    order = torch.argsort(flat.abs(), stable=True)[bottom : n - top]
    out = torch.zeros_like(flat)
    out[order] = flat[order]
    return _l1_rescaled(flat, out).view(tau.shape) if rescale else out.view(tau.shape)


def _l1_rescaled(tau: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    before, after = float(tau.abs().sum()), float(kept.abs().sum())
    return kept if before < eps or after < eps else kept.mul_(before / after)


def della_keep_probability(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per entry: density - epsilon + 2 epsilon * rank/(m-1), rank of |tau| within its row of m entries."""
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(tau.shape[0], -1)
    m = rows.shape[1]
    rank = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).float()
    frac = rank / (m - 1) if m > 1 else torch.full_like(rank, 0.5)
    return (density - epsilon + 2 * epsilon * frac).view(tau.shape)


def della_prune(tau: torch.Tensor, density: float, epsilon: float, rescale: bool, key: int) -> torch.Tensor:
    if density >= 1.0:
        return tau
    p = della_keep_probability(tau, density, epsilon)
    u = hash_uniform(key, torch.arange(tau.numel(), device=tau.device)).view(tau.shape)
    kept = tau * (u >= 1.0 - p)  # as DARE: keep when the draw is at least the drop probability
    return _l1_rescaled(tau, kept) if rescale else kept


def check_della(tensor_params: list[dict], g: dict) -> None:
    """mergekit's rule: every keep probability density +/- epsilon lies in (0, 1)."""
    for i, p in enumerate(tensor_params):
        d, e = p["density"], p["epsilon"]
        if d < 1.0 and not (0.0 < d - e and d + e < 1.0):
            raise ValueError(
                f"models.{i}.parameters.epsilon: {e} with density {d}, expected density +/- epsilon in (0, 1)"
            )


def breadcrumbs(c: TensorCall, sign: bool = False) -> torch.Tensor:
    taus = [
        outlier_trim(tau, p["density"], p["gamma"], c.g["rescale"])
        for tau, p in zip(task_vectors(c), c.params, strict=True)
    ]
    return mix(c, taus, sign)


def breadcrumbs_ties(c: TensorCall) -> torch.Tensor:
    return breadcrumbs(c, sign=True)


def della(c: TensorCall, sign: bool = True) -> torch.Tensor:
    seed = dare_seed(c.g["seed"], c.name)
    taus = [
        della_prune(tau, p["density"], p["epsilon"], c.g["rescale"], task_key(seed, t))
        for t, (tau, p) in enumerate(zip(task_vectors(c), c.params, strict=True))
    ]
    return mix(c, taus, sign)


def della_linear(c: TensorCall) -> torch.Tensor:
    return della(c, sign=False)


def sce(c: TensorCall) -> torch.Tensor:
    """Select (variance top-k positions), Calculate (mean-square weights), Erase (minority signs); torch, as
    the sign is elected from the unweighted sum while the mix is weighted (the kernels elect on the weighted)."""
    taus = torch.stack(task_vectors(c))
    if c.g["select_topk"] < 1.0:
        var = taus.var(0, unbiased=False).reshape(-1)
        k = int(c.g["select_topk"] * int(torch.count_nonzero(var)))
        keep = torch.zeros_like(var)
        keep[torch.topk(var, k).indices] = 1.0
        taus *= keep.view(taus.shape[1:])
    mean_sq = taus.reshape(len(taus), -1).pow(2).mean(1).double()
    w = mean_sq / mean_sq.sum() if float(mean_sq.sum()) > 0 else torch.full_like(mean_sq, 1.0 / len(taus))
    elected = torch.where(taus.sum(0) >= 0, 1.0, -1.0)
    ew = (torch.sign(taus) == elected).float() * w.float().view(-1, *([1] * (taus.dim() - 1)))
    div = ew.sum(0)
    div[div == 0] = 1.0
    return ((taus * ew).sum(0).div_(div) + c.base).to(c.out_dtype)


def _changed(c: TensorCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RAM's task vectors with the entries at most epsilon zeroed, which entries changed, and by how many."""
    taus = torch.stack(task_vectors(c))
    changed = taus.abs() > c.g["epsilon"]
    return taus.mul_(changed), changed, changed.sum(0)


def ram(c: TensorCall) -> torch.Tensor:
    taus, _, count = _changed(c)
    return (taus.sum(0).div_(count.clamp(min=1)) + c.base).to(c.out_dtype)


def ramplus_tl(c: TensorCall) -> torch.Tensor:
    taus, changed, count = _changed(c)
    dims = tuple(range(1, taus.dim()))
    shared = (changed & (count > 1)).sum(dims).double()
    unique = (changed & (count == 1)).sum(dims).double()
    rho = shared / unique.clamp(min=c.g["epsilon"])
    boost = (1 + c.g["r"] * rho.clamp(0.0, c.g["alpha"])).float().view(-1, *([1] * len(dims)))
    scale = torch.where(count == 1, boost, 1.0 / count.clamp(min=1))
    return ((taus * scale).sum(0) + c.base).to(c.out_dtype)
