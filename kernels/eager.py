"""The eager backend: combine and project as chunked torch ops (the CPU path for small tensors and where
torch.compile cannot build, and the readable statement of the semantics in kernels/spec.py that the compiled
and Triton backends are tested against). Each op works on one chunk in per-thread fp32 buffers (kernels/cpu.py)
so every input is read from memory once and the temporaries stay in cache.

- The sign election keeps running sums (in task order) of w_t tau'_t, of its positive and negative parts
  and of w_t over the tasks where w_t tau'_t > 0 / < 0: elected = (S >= 0), mix = S+ or S-, divisor = the
  matching weight sum. One pass over the tasks and O(1) buffers whatever T is; the Triton kernel does the same.
- project sums per-chunk fp32 dot products in a fixed order (fp64 for the final sum): deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .cpu import GRAIN, f32, int_scratch, new_output, run_chunks, scratch
from .spec import M1, M2, CombineSpec, check_project, combine_spec, s32, task_key


def hash_uniform_chunk(key: int, start: int, m: int, out: torch.Tensor) -> torch.Tensor:
    """spec.hash_uniform(key, arange(start, start + m)) written into fp32 `out`, ~4x faster: int32 arithmetic
    that wraps mod 2^32 (bit patterns as uint32; logical shifts as arithmetic shift + mask). Tested bit-identical."""
    x, t, ar = int_scratch(m, out.device)
    torch.add(ar, s32(start), out=x)
    x.bitwise_xor_(s32(key))
    for sh, mul in ((16, M1), (15, M2)):
        x.bitwise_xor_(torch.bitwise_right_shift(x, sh, out=t).bitwise_and_((1 << (32 - sh)) - 1))
        x.mul_(s32(mul))
    x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=t).bitwise_and_(0xFFFF))
    x.bitwise_right_shift_(8).bitwise_and_(0xFFFFFF)
    return out.copy_(x).mul_(1.0 / (1 << 24))


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
            out.append(_kth_largest_abs_delta(base.reshape(-1), e.reshape(-1), k))
    return out


@torch.no_grad()
def _kth_largest_abs_delta(b: torch.Tensor, e: torch.Tensor, k: int) -> float:
    """k-th largest |e - b| (fp32). On CPU: one fp32 buffer filled chunk by chunk and an in-place
    selection (numpy introselect), so the peak is 4 bytes per element and no fp32 copies of the inputs."""
    n = b.numel()
    mag = torch.empty(n, dtype=torch.float32, device=b.device)
    for s in range(0, n, 1 << 22):
        sl = slice(s, min(s + (1 << 22), n))
        mag[sl].copy_(e[sl]).sub_(b[sl]).abs_()  # in fp32: torch.sub(bf16, bf16, out=fp32) rounds to bf16
    if mag.device.type != "cpu":
        return float(torch.kthvalue(mag, n - k + 1).values)
    a = mag.numpy()
    a.partition(n - k)  # the (n-k+1)-th smallest (1-based) == torch.kthvalue(mag, n - k + 1)
    return float(a[n - k])


def combine_torch(base: torch.Tensor, experts: Sequence[torch.Tensor], weights, **options) -> torch.Tensor:
    """out = base_weight*base + scale*mix(expert_t - base); options as spec.combine_spec."""
    return combine_eager(base, experts, combine_spec(base, experts, weights, **options))


@torch.no_grad()
def combine_eager(base: torch.Tensor, experts: Sequence[torch.Tensor], spec: CombineSpec) -> torch.Tensor:
    """combine for a checked spec, chunk by chunk."""
    out = new_output(base.shape, spec.out_dtype, base.device)
    if base.numel() == 0:
        return out
    if spec.simple:
        _simple(base, experts, spec, out)
    else:
        _full(base, experts, spec, out)
    return out


def _simple(base: torch.Tensor, experts: Sequence[torch.Tensor], spec: CombineSpec, out: torch.Tensor) -> None:
    """base_coef*b + sum scale*w*e: one multiply-add pass per input."""
    b_flat, o_flat = base.reshape(-1), out.view(-1)
    terms = [(b_flat, spec.base_coef)] if spec.base_coef != 0.0 or not experts else []  # weights sum to 1: unread
    terms += [(e.reshape(-1), spec.scale * w) for e, w in zip(experts, spec.weights, strict=True)]
    out32, dev = out.dtype == torch.float32, base.device

    def chunk(i: int, s: int, stop: int) -> None:
        acc = o_flat[s:stop] if out32 else scratch(1, stop - s, dev)[0]
        for j, (x, c) in enumerate(terms):
            if j == 0:
                x = x[s:stop]
                if x.dtype == torch.float32:
                    torch.mul(x, c, out=acc)
                else:  # (torch.mul(bf16, c, out=fp32) would round the product to bf16)
                    acc.copy_(x).mul_(c)
            else:
                acc.add_(x[s:stop], alpha=c)  # mixed dtypes: computed in fp32, no bf16 rounding
        if not out32:
            o_flat[s:stop].copy_(acc)

    run_chunks(base.numel(), dev, chunk)


@torch.no_grad()
def combine_simple_rounded(base: torch.Tensor, experts: Sequence[torch.Tensor], spec: CombineSpec) -> torch.Tensor:
    """A simple combine (spec.simple) with the compiled kernel's rounding, bit for bit: base_coef*b first,
    then + (scale*w_t)*e_t, each product rounded to fp32 before it is added (no fused multiply-add), the base
    term kept when its coefficient is 0. Memory-bound, so chunked eager ops are near the compiled loop's speed
    and a merge of linear / task_arithmetic never pays torch.compile's start-up (seconds per process)."""
    out = new_output(base.shape, spec.out_dtype, base.device)
    if base.numel() == 0 or not experts:
        return combine_eager(base, experts, spec)
    b_flat, o_flat = base.reshape(-1), out.view(-1)
    terms = [(e.reshape(-1), spec.scale * w) for e, w in zip(experts, spec.weights, strict=True)]
    out32, dev = out.dtype == torch.float32, base.device

    def chunk(i: int, s: int, stop: int) -> None:
        bufs = scratch(2, stop - s, dev)
        acc = o_flat[s:stop] if out32 else bufs[0]
        acc.copy_(b_flat[s:stop]).mul_(spec.base_coef)
        for x, c in terms:
            acc.add_(bufs[1].copy_(x[s:stop]).mul_(c))
        if not out32:
            o_flat[s:stop].copy_(acc)

    run_chunks(base.numel(), dev, chunk)
    return out


def _full(base: torch.Tensor, experts: Sequence[torch.Tensor], spec: CombineSpec, out: torch.Tensor) -> None:
    # Masks are applied as exact 0/1 fp32 factors written by comparisons into fp32 buffers: torch.where,
    # masked_fill and bool tensors are several times slower on CPU. Same values as the formula for
    # finite inputs (an inf task vector element times a 0 mask gives nan instead of 0).
    b_flat, o_flat = base.reshape(-1), out.view(-1)
    e_flat = [e.reshape(-1) for e in experts]
    w, p, thr, dev = spec.weights, spec.drop_p, spec.thresholds, base.device
    sign, normalize = spec.sign_consensus, spec.normalize
    p32 = [float(torch.tensor(v, dtype=torch.float32)) for v in p]  # what a comparison with p sees

    def chunk(i: int, s: int, stop: int) -> None:
        m = stop - s
        bb, tau, acc, sp, sn, dp, dn, tmp = scratch(8, m, dev)
        b = f32(b_flat[s:stop], bb)
        for buf in (acc, sp, sn, dp, dn) if sign else (acc,):
            buf.zero_()
        for t, e in enumerate(e_flat):
            torch.sub(e[s:stop], b, out=tau)
            if p[t] > 0:
                keep = torch.ge(hash_uniform_chunk(task_key(spec.seed, t), spec.offset + s, m, tmp), p32[t], out=tmp)
                if spec.rescale:
                    tau.div_(1.0 - p[t])
                tau.mul_(keep)
            if thr is not None:
                tau.mul_(torch.ge(torch.abs(tau, out=tmp), thr[t], out=tmp))
            x = tau.mul_(w[t])
            acc.add_(x)
            if sign:
                sp.add_(torch.clamp(x, min=0.0, out=tmp))
                sn.add_(torch.clamp(x, max=0.0, out=tmp))
                if normalize:
                    dp.add_(torch.gt(x, 0.0, out=tmp), alpha=w[t])
                    dn.add_(torch.lt(x, 0.0, out=tmp), alpha=w[t])
        if sign:
            ipos = torch.ge(acc, 0.0, out=tmp)  # elected sign + (1.0) or - (0.0)
            ineg = torch.lt(acc, 0.0, out=tau)
            mix = sp.mul_(ipos).add_(sn.mul_(ineg))  # exact select: x*1 + y*0
            if normalize:
                div = dp.mul_(ipos).add_(dn.mul_(ineg))
                div.add_(torch.eq(div, 0.0, out=tmp))  # 0 -> 1
                mix.div_(div)
        else:
            mix = acc.div_(spec.div_const) if normalize else acc
        mix.mul_(spec.scale).add_(b, alpha=spec.base_weight)
        o_flat[s:stop].copy_(mix)

    run_chunks(base.numel(), dev, chunk)


@torch.no_grad()
def project_torch(grad: torch.Tensor, base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """g_t = <grad, expert_t - base> for every task, fp32, shape [T]."""
    check_project(grad, base, experts)
    T, n, dev = len(experts), grad.numel(), grad.device
    if T == 0 or n == 0:
        return torch.zeros(T, dtype=torch.float32, device=dev)
    gf, bf = grad.reshape(-1), base.reshape(-1)
    ef = [e.reshape(-1) for e in experts]
    part = torch.zeros(-(-n // GRAIN) + 1, T, dtype=torch.float32, device=dev)  # >= run_chunks' chunk count

    def chunk(i: int, s: int, stop: int) -> None:
        gbuf, bbuf, tau = scratch(3, stop - s, dev)
        gc, b = f32(gf[s:stop], gbuf), f32(bf[s:stop], bbuf)
        row = part[i]
        for t, e in enumerate(ef):
            torch.sub(e[s:stop], b, out=tau)  # difference first: <g,e> - <g,b> cancels badly
            torch.dot(gc, tau, out=row[t])

    used = run_chunks(n, dev, chunk)
    return part[:used].double().sum(0).float()
