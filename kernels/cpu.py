"""CPU machinery of the eager and compiled backends: chunk scheduling over a small pool of single-threaded
workers, per-thread fp32 scratch buffers, and outputs hinted for transparent huge pages.

- Every eager op works on one chunk of CHUNK elements in preallocated per-thread fp32 buffers, so each input
  is read from memory once and the temporaries stay in L2.
- On CPU the chunks are spread over a small pool of Python threads (each with torch intra-op threads = 1)
  that take chunks from a shared counter. That avoids one OpenMP fork/join per small op, which on a
  busy machine (another process on a core) can cost a whole scheduler time slice per op.
  BLOCKMERGE_CPU_THREADS sets the pool size (default torch.get_num_threads(); 1 = run inline).
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
GRAIN = 1 << 15  # below this torch runs elementwise ops serially anyway: no pool


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


def scratch(k: int, n: int, device) -> list[torch.Tensor]:
    """k fp32 scratch vectors of n elements, owned by the calling thread (reused across calls)."""
    key = (str(device), k)
    bufs = getattr(_tls, "bufs", None)
    if bufs is None:
        bufs = _tls.bufs = {}
    have = bufs.get(key)
    if have is None or have.shape[1] < n:
        have = bufs[key] = torch.empty(k, max(n, CHUNK), dtype=torch.float32, device=device)
    return [have[i, :n] for i in range(k)]


def int_scratch(n: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


HUGE_MIN = 8 << 20  # bytes: outputs at least this big get transparent huge pages
_libc = None


def madvise_hugepages(t: torch.Tensor) -> None:
    """Ask Linux for transparent huge pages on a fresh CPU tensor before it is first written: the first
    touch of a fresh large output otherwise costs one page fault per 4 KiB (measured here: allocating and
    filling 128 MiB took 106 ms with 4 KiB pages, 28 ms with huge pages, 21 ms for an existing buffer).
    Only a hint (MADV_HUGEPAGE): any failure is ignored. BLOCKMERGE_HUGEPAGES=0 turns it off."""
    global _libc
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or nbytes < HUGE_MIN or not sys.platform.startswith("linux"):
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
    madvise_hugepages(out)
    return out


def run_chunks(numel: int, device: torch.device, fn: Callable[[int, int, int], None]) -> int:
    """Call fn(i, start, stop) for the chunks of range(numel) (pool on CPU); returns the number of chunks."""
    workers = cpu_workers() if device.type == "cpu" else 1
    chunk = CHUNK
    if workers > 1 and numel < workers * CHUNK:
        chunk = max(GRAIN, -(-numel // workers))
    bounds = [(i, s, min(s + chunk, numel)) for i, s in enumerate(range(0, numel, chunk))]
    if workers <= 1 or len(bounds) <= 1 or numel < 2 * GRAIN:
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


def f32(x: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """x as fp32: x itself if it already is, else copied into buf."""
    return x if x.dtype == torch.float32 else buf.copy_(x)
