"""Torch reference of the task-vector kernels. It defines the semantics the Triton kernels must match,
and it is the CPU implementation: it works in chunks so the fp32 temporaries stay in cache.

combine:  out = base_weight * base + scale * mix(tau_1..tau_T),   tau_t = expert_t - base
  tau'_t = tau_t * keep_t / (1 - p_t)      DARE: keep_t from a counter-based hash of (seed, t, offset + i)
  tau'_t = tau'_t * (|tau'_t| >= thr_t)    TIES trim: thr_t is the per-task magnitude threshold
  m_t    = sign(tau'_t) == elected sign    TIES sign election over sum_t w_t tau'_t (>= 0 elects +)
  mix    = sum_t w_t m_t tau'_t / (sum_t w_t m_t  if normalize else 1)
project:  g_t = sum_i grad[i] * (expert_t[i] - base[i])      (dLoss/dGamma_t given dLoss/dW)

Implementation notes (CPU speed; the formulas above are the contract):
- Every op works on one chunk of CHUNK elements in preallocated per-thread fp32 buffers, so each input
  is read from memory once and the temporaries stay in L2.
- On CPU the chunks are spread over a small pool of Python threads (each with torch intra-op threads = 1)
  that take chunks from a shared counter. That avoids one OpenMP fork/join per small op, which on a
  busy machine (another process on a core) can cost a whole scheduler time slice per op.
  BLOCKMERGE_CPU_THREADS sets the pool size (default torch.get_num_threads(); 1 = run inline).
- The sign election keeps running sums (in task order) of w_t tau'_t, of its positive and negative parts
  and of w_t over the tasks where w_t tau'_t > 0 / < 0: elected = (S >= 0), mix = S+ or S-, divisor = the
  matching weight sum. One pass over the tasks and O(1) buffers whatever T is; the Triton kernel does the same.
- project sums per-chunk fp32 dot products in a fixed order (fp64 for the final sum): deterministic.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

CHUNK = 1 << 18  # elements per chunk: a few fp32 temporaries of this size fit in L2
_GRAIN = 1 << 15  # below this torch runs elementwise ops serially anyway: no pool

# 32-bit hash constants (lowbias32 by C. Wellons) and the golden-ratio key mixers.
_M1, _M2 = 0x7FEB352D, 0x846CA68B
_K1, _K2 = 0x27D4EB2D, 0x165667B1
_MASK32 = 0xFFFFFFFF


def task_key(seed: int, task: int) -> int:
    """The 32-bit key of task `task`'s DARE stream: the same on every path."""
    return (seed * _K1 + (task + 1) * _K2) & _MASK32


def _mul32_(x: torch.Tensor, c: int) -> torch.Tensor:
    # x = (x * c) mod 2^32 in place on int64 (x < 2^32) without overflowing: split c into 16-bit halves.
    lo, hi = c & 0xFFFF, c >> 16
    t = x * hi
    t.bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return x.mul_(lo).add_(t).bitwise_and_(_MASK32)


def hash_uniform(key: int, index: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) float32 per element index (int64, < 2^32), counter-based: no state, any order."""
    x = (index & _MASK32).bitwise_xor_(key)
    x.bitwise_xor_(x >> 16)
    _mul32_(x, _M1)
    x.bitwise_xor_(x >> 15)
    _mul32_(x, _M2)
    x.bitwise_xor_(x >> 16)
    return x.bitwise_right_shift_(8).to(torch.float32).mul_(1.0 / (1 << 24))


def dare_keep(seed: int, task: int, p: float, offset: int, numel: int, device="cpu") -> torch.Tensor:
    """Boolean keep-mask of DARE for elements offset .. offset+numel of one task (keep with prob 1-p)."""
    idx = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    return hash_uniform(task_key(seed, task), idx) >= p


def _s32(v: int) -> int:
    """The int32 with the bit pattern of v mod 2^32."""
    v &= _MASK32
    return v - (1 << 32) if v >= 1 << 31 else v


def _hash_uniform_chunk(key: int, start: int, m: int, out: torch.Tensor) -> torch.Tensor:
    """hash_uniform(key, arange(start, start + m)) written into fp32 `out`, ~4x faster: int32 arithmetic that
    wraps mod 2^32 (bit patterns as uint32; logical shifts as arithmetic shift + mask). Tested bit-identical."""
    x, t, ar = _int_scratch(m, out.device)
    torch.add(ar, _s32(start), out=x)
    x.bitwise_xor_(_s32(key))
    for sh, mul in ((16, _M1), (15, _M2)):
        x.bitwise_xor_(torch.bitwise_right_shift(x, sh, out=t).bitwise_and_((1 << (32 - sh)) - 1))
        x.mul_(_s32(mul))
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


def check_experts(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> None:
    """Every expert has the base's shape and device (all kernel paths check the same way)."""
    for e in experts:
        if e.shape != base.shape:
            raise ValueError(f"expert shape {list(e.shape)} != base shape {list(base.shape)}")
        if e.device != base.device:
            raise ValueError(f"expert on {e.device} but base on {base.device}")


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


# ----------------------------------------------------------------------------------------------------------
# chunk scheduling: a pool of single-threaded workers, per-thread scratch buffers

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()
_tls = threading.local()


def _reset_after_fork() -> None:  # pool threads do not survive fork(): the child starts a new pool
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def cpu_workers() -> int:
    """Number of pool threads the CPU path uses (BLOCKMERGE_CPU_THREADS, default torch.get_num_threads())."""
    env = os.environ.get("BLOCKMERGE_CPU_THREADS", "").strip()
    return max(1, int(env)) if env else max(1, torch.get_num_threads())


def _worker_init() -> None:
    torch.set_num_threads(1)  # per-thread (OpenMP ICV): the caller's threads are unaffected


def _get_pool(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(n, thread_name_prefix="blockmerge-cpu", initializer=_worker_init)
            _pool_size = n
        return _pool


def _scratch(k: int, n: int, device) -> list[torch.Tensor]:
    """k fp32 scratch vectors of n elements, owned by the calling thread (reused across calls)."""
    key = (str(device), k)
    bufs = getattr(_tls, "bufs", None)
    if bufs is None:
        bufs = _tls.bufs = {}
    have = bufs.get(key)
    if have is None or have.shape[1] < n:
        have = bufs[key] = torch.empty(k, max(n, CHUNK), dtype=torch.float32, device=device)
    return [have[i, :n] for i in range(k)]


def _int_scratch(n: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two int32 scratch vectors and arange(n) (int32), owned by the calling thread."""
    key = (str(device), "int")
    bufs = getattr(_tls, "bufs", None)
    if bufs is None:
        bufs = _tls.bufs = {}
    have = bufs.get(key)
    if have is None or have.shape[1] < n:
        size = max(n, CHUNK)
        have = bufs[key] = torch.empty(3, size, dtype=torch.int32, device=device)
        torch.arange(size, dtype=torch.int32, device=device, out=have[2])
    return have[0, :n], have[1, :n], have[2, :n]


_HUGE_MIN = 8 << 20  # bytes: outputs at least this big get transparent huge pages
_libc = None


def _madvise_hugepages(t: torch.Tensor) -> None:
    """Ask Linux for transparent huge pages on a fresh CPU tensor before it is first written: the first
    touch of a fresh large output otherwise costs one page fault per 4 KiB (measured here: allocating and
    filling 128 MiB took 106 ms with 4 KiB pages, 28 ms with huge pages, 21 ms for an existing buffer).
    Only a hint (MADV_HUGEPAGE): any failure is ignored. BLOCKMERGE_HUGEPAGES=0 turns it off."""
    global _libc
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or nbytes < _HUGE_MIN or not sys.platform.startswith("linux"):
        return
    if _libc is False or os.environ.get("BLOCKMERGE_HUGEPAGES", "1") == "0":
        return
    try:
        if _libc is None:
            import ctypes

            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        page = 4096
        start = -(-t.data_ptr() // page) * page
        end = (t.data_ptr() + nbytes) // page * page
        _libc.madvise(start, end - start, 14)  # MADV_HUGEPAGE
    except Exception:  # a hint only
        _libc = False


def new_output(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised CPU-path output, hinted for huge pages before anything writes it."""
    out = torch.empty(shape, dtype=dtype, device=device)
    _madvise_hugepages(out)
    return out


def _run_chunks(numel: int, device: torch.device, fn: Callable[[int, int, int], None]) -> int:
    """Call fn(i, start, stop) for the chunks of range(numel) (pool on CPU); returns the number of chunks."""
    workers = cpu_workers() if device.type == "cpu" else 1
    chunk = CHUNK
    if workers > 1 and numel < workers * CHUNK:
        chunk = max(_GRAIN, -(-numel // workers))
    bounds = [(i, s, min(s + chunk, numel)) for i, s in enumerate(range(0, numel, chunk))]
    if workers <= 1 or len(bounds) <= 1 or numel < 2 * _GRAIN:
        for b in bounds:
            fn(*b)
        return len(bounds)
    counter = itertools.count()  # next() is atomic under the GIL: dynamic load balancing

    def work() -> None:
        with torch.no_grad():
            while (j := next(counter)) < len(bounds):
                fn(*bounds[j])

    pool = _get_pool(workers)
    futs = [pool.submit(work) for _ in range(min(workers, len(bounds)))]
    for f in futs:
        f.result()
    return len(bounds)


def _f32(x: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """x as fp32: x itself if it already is, else copied into buf."""
    return x if x.dtype == torch.float32 else buf.copy_(x)


# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
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
    check_experts(base, experts)
    out = new_output(base.shape, out_dtype or base.dtype, base.device)
    n = base.numel()
    if n == 0:
        return out
    b_flat, o_flat = base.reshape(-1), out.view(-1)
    e_flat = [e.reshape(-1) for e in experts]
    simple = not any(p) and thr is None and not sign_consensus and not normalize
    out32 = out.dtype == torch.float32
    dev = base.device

    if simple:
        # base_weight*b + scale*sum w (e - b) = (base_weight - scale*sum w)*b + sum scale*w*e: one pass per input
        coef_b = base_weight - scale * sum(w)
        coef = [scale * wt for wt in w]
        terms = [(b_flat, coef_b)] if coef_b != 0.0 or T == 0 else []  # e.g. weights summing to 1: base unread
        terms += list(zip(e_flat, coef, strict=True))

        def simple_chunk(i: int, s: int, stop: int) -> None:
            m = stop - s
            acc = o_flat[s:stop] if out32 else _scratch(1, m, dev)[0]
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

        _run_chunks(n, dev, simple_chunk)
        return out

    div_const = 1.0
    if normalize and not sign_consensus:
        sw = sum(w)
        div_const = sw if abs(sw) >= 1e-8 else 1.0

    p32 = [float(torch.tensor(v, dtype=torch.float32)) for v in p]  # what a comparison with p sees

    def full_chunk(i: int, s: int, stop: int) -> None:
        # Masks are applied as exact 0/1 fp32 factors written by comparisons into fp32 buffers: torch.where,
        # masked_fill and bool tensors are several times slower on CPU. Same values as the formula for
        # finite inputs (an inf task vector element times a 0 mask gives nan instead of 0).
        m = stop - s
        bb, tau, acc, sp, sn, dp, dn, tmp = _scratch(8, m, dev)
        b = _f32(b_flat[s:stop], bb)
        acc.zero_()
        if sign_consensus:
            sp.zero_()
            sn.zero_()
            if normalize:
                dp.zero_()
                dn.zero_()
        for t, e in enumerate(e_flat):
            torch.sub(e[s:stop], b, out=tau)
            if p[t] > 0:
                keep = torch.ge(_hash_uniform_chunk(task_key(seed, t), offset + s, m, tmp), p32[t], out=tmp)
                if rescale:
                    tau.div_(1.0 - p[t])
                tau.mul_(keep)
            if thr is not None:
                tau.mul_(torch.ge(torch.abs(tau, out=tmp), thr[t], out=tmp))
            x = tau.mul_(w[t])
            acc.add_(x)
            if sign_consensus:
                sp.add_(torch.clamp(x, min=0.0, out=tmp))
                sn.add_(torch.clamp(x, max=0.0, out=tmp))
                if normalize:
                    dp.add_(torch.gt(x, 0.0, out=tmp), alpha=w[t])
                    dn.add_(torch.lt(x, 0.0, out=tmp), alpha=w[t])
        if sign_consensus:
            ipos = torch.ge(acc, 0.0, out=tmp)  # elected sign + (1.0) or - (0.0)
            ineg = torch.lt(acc, 0.0, out=tau)
            mix = sp.mul_(ipos).add_(sn.mul_(ineg))  # exact select: x*1 + y*0
            if normalize:
                div = dp.mul_(ipos).add_(dn.mul_(ineg))
                div.add_(torch.eq(div, 0.0, out=tmp))  # 0 -> 1
                mix.div_(div)
        else:
            mix = acc
            if normalize:
                mix.div_(div_const)
        mix.mul_(scale).add_(b, alpha=base_weight)
        o_flat[s:stop].copy_(mix)

    _run_chunks(n, dev, full_chunk)
    return out


@torch.no_grad()
def project_torch(grad: torch.Tensor, base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """g_t = <grad, expert_t - base> for every task, fp32, shape [T]."""
    if grad.shape != base.shape:
        raise ValueError(f"grad shape {list(grad.shape)} != base shape {list(base.shape)}")
    check_experts(base, experts)
    T = len(experts)
    n = grad.numel()
    dev = grad.device
    gf, bf = grad.reshape(-1), base.reshape(-1)
    ef = [e.reshape(-1) for e in experts]
    if T == 0 or n == 0:
        return torch.zeros(T, dtype=torch.float32, device=dev)
    nchunks = -(-n // _GRAIN) + 1  # upper bound on the chunk count of _run_chunks
    part = torch.zeros(nchunks, T, dtype=torch.float32, device=dev)

    def chunk(i: int, s: int, stop: int) -> None:
        gbuf, bbuf, tau = _scratch(3, stop - s, dev)
        gc, b = _f32(gf[s:stop], gbuf), _f32(bf[s:stop], bbuf)
        row = part[i]
        for t, e in enumerate(ef):
            torch.sub(e[s:stop], b, out=tau)  # difference first: <g,e> - <g,b> cancels badly
            torch.dot(gc, tau, out=row[t])

    used = _run_chunks(n, dev, chunk)
    return part[:used].double().sum(0).float()
