"""Divergences between a teacher (expert) distribution and the student's (merged model's) logits,
per position, natural log. The teacher is given either as full-vocabulary probabilities or as its
top-k token probabilities plus the remaining (tail) mass as one bucket; in the latter case the
student's distribution is coarsened the same way (its top-k ids' probabilities + everything else),
and the divergence is taken between the two (k+1)-bucket distributions.

JS(p || q) = 0.5 KL(p || m) + 0.5 KL(q || m), m = (p + q) / 2;   KL(p || q) = sum p (log p - log q);
entropy(q) = -sum q log q (the student's full distribution; AdaMerging's objective).

`chunked_head_loss` runs final norm + lm_head + log_softmax + divergence over chunks of positions,
backpropagating each chunk at once, so full-vocabulary logits of a whole batch never exist."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OBJECTIVES = ("js", "kl", "entropy")


@dataclass
class Targets:
    """Teacher distributions at N positions: `probs` [N, V], or `ids` [N, k] + `probs` [N, k] + `tail` [N]."""

    probs: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    tail: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.probs is None else self.probs.shape[0]

    @property
    def topk(self) -> bool:
        return self.ids is not None

    def slice(self, sl: slice) -> Targets:
        return Targets(
            None if self.probs is None else self.probs[sl],
            None if self.ids is None else self.ids[sl],
            None if self.tail is None else self.tail[sl],
        )

    def to(self, device) -> Targets:
        f = lambda x: None if x is None else x.to(device)
        return Targets(f(self.probs), f(self.ids), f(self.tail))

    @staticmethod
    def cat(parts: list[Targets]) -> Targets:
        parts = [p for p in parts if p.probs is not None]
        if not parts:
            return Targets()
        c = lambda xs: None if xs[0] is None else torch.cat(xs)
        return Targets(c([p.probs for p in parts]), c([p.ids for p in parts]), c([p.tail for p in parts]))


def check_objective(objective: str, targets: Targets | None) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")
    if objective != "entropy" and targets is None:
        raise ValueError(f"objective {objective!r} needs teacher distributions")


def coarsen(logq: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Student log-probs over the teacher's k ids + one tail bucket: [N, k+1]."""
    top = logq.gather(-1, ids)
    rest = logq.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([top, rest], -1)


def teacher_dist(t: Targets) -> torch.Tensor:
    return torch.cat([t.probs, t.tail[:, None]], -1) if t.topk else t.probs


def _kl_terms(p: torch.Tensor, logp: torch.Tensor, logr: torch.Tensor) -> torch.Tensor:
    """sum p (log p - log r) per row, with 0 log 0 = 0."""
    pos = p > 0
    return torch.where(pos, p * (torch.where(pos, logp, 0.0) - logr), 0.0).sum(-1)


def divergence(logq: torch.Tensor, targets: Targets | None, objective: str) -> torch.Tensor:
    """Per-position divergence [N] of log_softmax'd student logits `logq` [N, V] against `targets`."""
    if objective == "entropy":
        return -(logq.exp() * logq).sum(-1)
    if targets.topk:
        logq = coarsen(logq, targets.ids)
    p = teacher_dist(targets).to(logq.dtype)
    logp = torch.log(p)
    if objective == "kl":
        return _kl_terms(p, logp, logq)
    if objective == "js":
        logm = torch.logaddexp(torch.where(p > 0, logp, float("-inf")), logq) - math.log(2.0)
        q = logq.exp()
        return 0.5 * _kl_terms(p, logp, logm) + 0.5 * _kl_terms(q, logq, logm)
    raise ValueError(f"objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")


def topk_targets(logits_or_logp: torch.Tensor, k: int) -> Targets:
    """Top-k + tail representation of a teacher's distribution (from logits or log-probs) [N, V]."""
    logp = torch.log_softmax(logits_or_logp.float(), -1)
    vals, ids = logp.topk(min(k, logp.shape[-1]), -1)
    probs = vals.exp()
    # tail mass from the log-sum-exp of the rest: exact even when the top-k sum rounds to 1
    tail = logp.scatter(-1, ids, float("-inf")).logsumexp(-1).exp()
    return Targets(probs=probs, ids=ids.to(torch.int32), tail=tail)


def chunked_head_loss(
    h: torch.Tensor,
    weights: torch.Tensor,
    targets: Targets | None,
    objective: str,
    norm: Callable[[torch.Tensor], torch.Tensor],
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None = None,
    chunk: int = 1024,
    backward: bool = True,
    final: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """sum_i weights[i] * divergence_i over the positions (rows) of `h` [N, H], chunk by chunk, with
    logits = final(norm(h) @ head_weight.T (+ head_bias)) (`final`: the model's own logit transformation).

    With `backward`, each chunk is backpropagated at once: into h.grad (when h requires grad), into the
    parameters `norm` closes over, and into head_weight.grad IN PLACE (addmm_ of the chunk's
    dlogits^T @ y): autograd would build each chunk's [V, H] weight gradient as a new tensor before
    adding it, i.e. a second vocabulary-sized matrix at once."""
    total = 0.0
    grad_w = backward and head_weight.requires_grad
    if grad_w and head_weight.grad is None:
        head_weight.grad = torch.zeros_like(head_weight)
    for s in range(0, h.shape[0], chunk):
        sl = slice(s, min(s + chunk, h.shape[0]))
        y = norm(h[sl])
        yd = y.detach().requires_grad_(backward and y.requires_grad)
        logits = F.linear(yd, head_weight.detach(), head_bias)
        if grad_w:
            if not logits.requires_grad:
                logits.requires_grad_(True)
            logits.retain_grad()
        out = logits if final is None else final(logits)
        logq = torch.log_softmax(out.to(torch.promote_types(out.dtype, torch.float32)), -1)
        div = divergence(logq, None if targets is None else targets.slice(sl).to(logq.device), objective)
        loss = (div * weights[sl].to(div)).sum()
        if backward and loss.requires_grad:
            loss.backward()
            if grad_w:
                head_weight.grad.addmm_(
                    logits.grad.reshape(-1, logits.shape[-1]).T.to(yd), yd.detach().reshape(-1, yd.shape[-1])
                )
            if yd.grad is not None:
                y.backward(yd.grad)
        total += float(loss.detach())
    return total
