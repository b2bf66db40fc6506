"""Adapter merges with PEFT's add_weighted_adapter semantics: combine adapters of one base into one adapter.

Adapter t adds s_t * B_t A_t to the base weight W0 (see blockmerge.lora.adapter). Per adapted module:

  cat              A = [w_1 s_1 A_1; ...; w_T s_T A_T], B = [B_1 ... B_T]          exact, rank sum_t r_t
  linear           A = sum_t sign(w_t s_t) sqrt|w_t s_t| A_t, B = sum_t sqrt|w_t s_t| B_t   (same ranks)
  ties, dare_*, magnitude_prune   the same per-factor weights, PEFT's ties/dare formula on A and on B
  svd              D = sum_t w_t s_t B_t A_t per module, truncated SVD: B = U S, A = V^T   (rank --rank)
  ties_svd, dare_ties_svd, dare_linear_svd, magnitude_prune_svd   PEFT's formula on the deltas s_t B_t A_t,
                   then the truncated SVD
The merged adapter has lora_alpha = r (scale 1), like PEFT's. Only one module's deltas exist at a time.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from blockmerge.lora.adapter import PREFIX, Adapter, AdapterError, MergedAdapter, natural_key, target_modules

ADAPTER_METHODS = (
    "cat",
    "linear",
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "svd",
    "ties_svd",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune_svd",
)
DENSITY_METHODS = {m for m in ADAPTER_METHODS if m.startswith(("ties", "dare", "magnitude"))}


# ---------------------------------------------------------------------------------- PEFT merge formulas
# Written after peft.utils.merge_utils (PEFT's add_weighted_adapter): the TIES sign election is over the
# unweighted pruned tensors ("total" or "frequency") and the disjoint mean divides by the number of agreeing
# tasks, which differs from mergekit's TIES used for full checkpoints.


def dare_mask(shape, density: float, seed: int, module: str, task: int, part: str) -> torch.Tensor:
    """DARE keep-mask (Bernoulli(density)) of one task's tensor of one module: seeded per (seed, module,
    task, part) so the result does not depend on the order modules are processed in."""
    h = hashlib.blake2b(f"{seed}|{module}|{task}|{part}".encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(h, "little") & ((1 << 63) - 1))
    return torch.bernoulli(torch.full(tuple(shape), float(density)), generator=g)


def _magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return t
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype)
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return t * mask.reshape(t.shape)


def _random_prune(t: torch.Tensor, density: float, mask: torch.Tensor) -> torch.Tensor:
    if density >= 1:
        return t
    return t * mask.to(t.dtype) / density


def combine_tasks(
    method: str,
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    masks: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """PEFT's task_arithmetic / ties / dare_linear / dare_ties / magnitude_prune over tensors of one module.
    `method` without an `_svd` suffix; `masks` are the DARE keep-masks (one per tensor)."""
    if method in ("linear", "svd"):
        pruned = tensors
    elif method in ("ties", "magnitude_prune"):
        pruned = [_magnitude_prune(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        pruned = [_random_prune(t, density, m) for t, m in zip(tensors, masks, strict=True)]
    else:
        raise AdapterError(f"unknown method {method!r}")
    stacked = torch.stack(pruned, dim=0)
    w = weights.to(stacked.dtype).view((-1,) + (1,) * (stacked.dim() - 1))
    weighted = stacked * w
    if method not in ("ties", "dare_ties"):
        return weighted.sum(dim=0)
    sign = stacked.sign()
    if majority_sign_method == "total":
        magnitude = stacked.sum(dim=0)
    elif majority_sign_method == "frequency":
        magnitude = sign.sum(dim=0)
    else:
        raise AdapterError(f"majority_sign_method {majority_sign_method!r}: expected total or frequency")
    agree = sign == torch.where(magnitude >= 0, 1, -1)
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def truncated_svd(
    delta: torch.Tensor, rank: int, *, clamp: float | None = None, full_matrices: bool = False, driver=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A the best rank-`rank` approximation of delta: A = V^T[:rank], B = U[:, :rank] S.
    Padded with zeros when delta has fewer singular values than rank. clamp: PEFT's svd_clamp quantile."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(rank, S.shape[0])
    B = U[:, :k] @ torch.diag(S[:k])
    A = Vh[:k, :]
    if clamp is not None:
        dist = torch.cat([B.flatten(), A.flatten()])
        hi = torch.quantile(dist, clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    if k < rank:
        A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1)
    return A, B


def merge_adapters(
    adapters: Sequence[Adapter],
    weights: Sequence[float] | None,
    method: str = "svd",
    *,
    density: float | None = None,
    rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = False,
    svd_driver: str | None = None,
    majority_sign_method: str = "total",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    mask_fn=None,
) -> MergedAdapter:
    """Combine adapters into one adapter as PEFT's add_weighted_adapter does (see the module docstring).
    mask_fn(shape, density, seed, module, task, part) replaces `dare_mask` (tests use it to feed PEFT the
    same DARE masks)."""
    if method not in ADAPTER_METHODS:
        raise AdapterError(f"unknown method {method!r}: expected one of {', '.join(ADAPTER_METHODS)}")
    T = len(adapters)
    weights = [1.0] * T if weights is None else [float(w) for w in weights]
    if len(weights) != T:
        raise AdapterError(f"--weights: expected {T} values (one per adapter), got {len(weights)}")
    if rank is not None and not method.endswith("svd"):
        raise AdapterError(f"--rank applies to the svd methods only, not to {method}")
    if T == 1:
        method, rank = "linear", None  # PEFT: a single adapter is always merged linearly
    if any(not math.isfinite(w) for w in weights):
        raise AdapterError(f"--weights: {weights} must be finite numbers")
    if method in DENSITY_METHODS:
        if density is None:
            raise AdapterError(f"method {method} needs --density")
        if method.startswith("dare") and not 0 < density <= 1:  # DARE rescales the kept values by 1/density
            raise AdapterError(f"--density must be in (0, 1] for {method}, got {density}")
        if not 0 <= density <= 1:
            raise AdapterError(f"--density must be in [0, 1], got {density}")
    if svd_clamp is not None and not 0 <= svd_clamp <= 1:
        raise AdapterError(f"--svd-clamp must be a quantile in [0, 1], got {svd_clamp}")
    mask_fn = mask_fn or dare_mask
    ranks = [a.r for a in adapters]
    svd = method.endswith("svd")
    if method == "cat":
        new_rank = sum(ranks)
    elif svd:
        new_rank = rank if rank is not None else max(ranks)
    else:
        if len(set(ranks)) != 1:
            raise AdapterError(f"method {method} needs adapters of the same rank, got r={ranks} (use cat or svd)")
        new_rank = ranks[0]
    if new_rank <= 0:
        raise AdapterError(f"--rank must be positive, got {new_rank}")
    out_dtype = dtype or adapters[0].dtype
    modules = sorted({m for a in adapters for m in a.modules}, key=natural_key)
    tensors: dict[str, torch.Tensor] = {}
    f32 = torch.float32
    for mod in modules:
        present = [
            (t, a.modules[mod], w) for t, (a, w) in enumerate(zip(adapters, weights, strict=True)) if mod in a.modules
        ]
        ref = present[0][1]
        out_f, in_f = ref.B.shape[0], ref.A.shape[1]
        if method == "cat":
            A = torch.zeros(new_rank, in_f, dtype=f32)
            B = torch.zeros(out_f, new_rank, dtype=f32)
            As = torch.cat([m.A.to(f32) * w * m.scale for _, m, w in present])
            Bs = torch.cat([m.B.to(f32) for _, m, _ in present], dim=1)
            A[: As.shape[0]] = As
            B[:, : Bs.shape[1]] = Bs
        elif svd:
            deltas = [(m.B.to(f32) @ m.A.to(f32)) * m.scale for _, m, _ in present]
            base_method = "linear" if method == "svd" else method.removesuffix("_svd")
            masks = None
            if base_method.startswith("dare"):
                masks = [
                    mask_fn(d.shape, density, seed, mod, t, "delta")
                    for (t, _, _), d in zip(present, deltas, strict=True)
                ]
            delta = combine_tasks(
                base_method,
                deltas,
                torch.tensor([w for _, _, w in present]),
                density=density,
                majority_sign_method=majority_sign_method,
                masks=masks,
            )
            del deltas
            if not bool(torch.isfinite(delta).all()):
                raise AdapterError(f"module {mod}: the combined update has NaN/Inf values; cannot take its SVD")
            try:
                A, B = truncated_svd(
                    delta, new_rank, clamp=svd_clamp, full_matrices=svd_full_matrices, driver=svd_driver
                )
            except torch.linalg.LinAlgError as e:
                raise AdapterError(f"module {mod}: SVD failed ({' '.join(str(e).split())})") from None
            del delta
        else:
            shapes = {tuple(m.A.shape) for _, m, _ in present}
            if len(shapes) != 1:
                raise AdapterError(f"module {mod}: adapters have different ranks here; use cat or svd")
            wA, wB = [], []
            for _, m, w in present:
                ws = w * m.scale
                wA.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))
                wB.append(math.sqrt(abs(ws)))
            parts = []
            for part, w_part in (("A", wA), ("B", wB)):
                ts = [(m.A if part == "A" else m.B).to(f32) for _, m, _ in present]
                masks = None
                if method.startswith("dare"):
                    masks = [
                        mask_fn(x.shape, density, seed, mod, t, part) for (t, _, _), x in zip(present, ts, strict=True)
                    ]
                parts.append(
                    combine_tasks(
                        method,
                        ts,
                        torch.tensor(w_part),
                        density=density,
                        majority_sign_method=majority_sign_method,
                        masks=masks,
                    )
                )
            A, B = parts
        tensors[f"{PREFIX}{mod}.lora_A.weight"] = A.to(out_dtype).contiguous()
        tensors[f"{PREFIX}{mod}.lora_B.weight"] = B.to(out_dtype).contiguous()
    config = dict(adapters[0].config)
    config.update(
        r=new_rank,
        lora_alpha=new_rank,
        target_modules=target_modules(adapters),
        alpha_pattern={},
        rank_pattern={},
        use_rslora=False,  # the source scales are folded into the factors: the merged scale must be exactly 1
    )
    return MergedAdapter(config, tensors)
