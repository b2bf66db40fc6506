"""CPU kernels for combine and project: the formulas of spec.py written as plain torch expressions and
compiled by torch.compile (Inductor's C++ backend with OpenMP) into one vectorised loop per call. Each input
is read once, converted to fp32 in registers and never stored as a temporary: the fused loop runs at memory
speed, where the eager backend pays one pass over an fp32 buffer per torch op (see benchmarks/kernels.py).

Same arguments (spec.py) and semantics as the eager backend (eager.py), which stays the fallback when
torch.compile cannot build (no C++ compiler, unsupported platform). A failed build is retried once in a
fresh cache directory first (a poisoned or unwritable Inductor cache), then the process falls back to the
eager path with one warning. Rounding may differ from the eager path by an ulp (operation order, fused
multiply-adds): tests hold them to per-dtype tolerances.

One compiled graph per structure (number of experts, dtypes, which options are on); the numbers (weights,
DARE probabilities, thresholds, seed keys, offsets) are tensors, and shapes are dynamic, so a merge compiles
a graph or two once and reuses them for every tensor. Inductor caches compiled code on disk
(TORCHINDUCTOR_CACHE_DIR, default /tmp/torchinductor_$USER), so later processes skip the compiler.
"""

from __future__ import annotations

import atexit
import functools
import getpass
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence

import torch

from .cpu import new_output
from .eager import combine_eager, project_torch
from .spec import M1, M2, CombineSpec, check_project, combine_spec, s32, task_key

# The dispatch sends smaller tensors to the eager backend, which is as fast there (per-call overheads
# dominate both): a process with only small tensors (tests, tiny models) never pays torch.compile's start-up,
# about 4 s for importing Inductor and loading the cached kernels, plus a few seconds per graph when cold.
MIN_NUMEL = 1 << 18
CALL_MAX = 1 << 30  # elements per compiled call: the DARE counter inside is int32
PROJECT_CHUNK = 1 << 20  # project sums chunks of this size in fp32 and the chunk sums in fp64
RECOMPILE_LIMIT = 256  # graphs per formula (dynamo's default of 8 would silently fall back to eager)

_compiled: dict[str, object] = {}
_broken: str | None = None  # why torch.compile failed in this process (the eager path is used from then on)
_fresh_cache_dir: str | None = None  # the new Inductor cache this process switched to after a failure


def hash_uniform32(key: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """spec.hash_uniform in int32 arithmetic that wraps mod 2^32 (vectorises; int64 multiplies do not on
    AVX2): logical shifts as arithmetic shifts + masks, constants as their int32 bit patterns."""
    x = idx ^ key
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * s32(M1)
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * s32(M2)
    x = x ^ ((x >> 16) & 0xFFFF)
    return ((x >> 8) & 0xFFFFFF).to(torch.float32) * (1.0 / (1 << 24))


def combine_formula(
    b: torch.Tensor,
    experts: Sequence[torch.Tensor],
    coef: torch.Tensor,
    keys: torch.Tensor,
    offset: torch.Tensor,
    *,
    dare: tuple[bool, ...],
    trim: bool,
    sign: bool,
    normalize: bool,
    simple: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The spec.py formula on flat tensors. coef (fp32): [base_weight, scale, divisor, w_t..., p_t...,
    rescale_t..., thr_t...]; in the simple case (no DARE/TIES/normalize) coef[0] is the base's own coefficient
    base_weight - scale*sum(w) and w_t are scale*w_t, so every input is one multiply-add."""
    T = len(experts)
    W, P, R, THR = 3, 3 + T, 3 + 2 * T, 3 + 3 * T
    if simple:
        acc = b.float() * coef[0]
        for t, e in enumerate(experts):
            acc = acc + e.float() * coef[W + t]
        return acc.to(out_dtype)
    b32 = b.float()
    acc = sp = sn = dp = dn = idx = None
    for t, e in enumerate(experts):
        tau = e.float() - b32
        if dare[t]:
            if idx is None:
                idx = torch.arange(b.numel(), dtype=torch.int32, device=b.device) + offset
            keep = (hash_uniform32(keys[t], idx) >= coef[P + t]).float()
            tau = tau * coef[R + t] * keep
        if trim:
            tau = tau * (tau.abs() >= coef[THR + t]).float()
        x = tau * coef[W + t]
        acc = x if acc is None else acc + x
        if sign:  # running sums of the positive / negative parts and of their weights (see eager.py)
            sp = x.clamp(min=0.0) if sp is None else sp + x.clamp(min=0.0)
            sn = x.clamp(max=0.0) if sn is None else sn + x.clamp(max=0.0)
            if normalize:
                wp, wn = (x > 0).float() * coef[W + t], (x < 0).float() * coef[W + t]
                dp = wp if dp is None else dp + wp
                dn = wn if dn is None else dn + wn
    if sign:
        pos = (acc >= 0).float()  # elected sign
        mix = sp * pos + sn * (1.0 - pos)
        if normalize:
            div = dp * pos + dn * (1.0 - pos)
            mix = mix / (div + (div == 0).float())
    else:
        mix = acc / coef[2] if normalize else acc
    return (mix * coef[1] + b32 * coef[0]).to(out_dtype)


def combine_into(out: torch.Tensor, *args, **kw) -> None:
    """combine_formula written into out (Inductor fuses the copy: the loop stores straight into out)."""
    out.copy_(combine_formula(*args, **kw))


def project_formula(g: torch.Tensor, b: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """[T] fp32: sum(g * (e_t - b)) over one chunk (difference first: <g,e> - <g,b> cancels badly)."""
    g32, b32 = g.float(), b.float()
    return torch.stack([(g32 * (e.float() - b32)).sum() for e in experts])


def _writable_cache() -> None:
    """Before the first compile: a cache directory that cannot be written (a file in its place, no
    permission) breaks the compiler while it imports, past any retry; point Inductor at a fresh one."""
    # Inductor's default (torch/_inductor/runtime/cache_dir_utils.py), not imported: importing the compiler
    # is what fails on such a directory
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid_{os.getuid()}"
    d = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(tempfile.gettempdir(), f"torchinductor_{user}")
    try:
        os.makedirs(d, exist_ok=True)
        tempfile.TemporaryFile(dir=d).close()
    except OSError:
        _fresh_cache()


def _call(name: str, fn, *args, **kw):
    compiled_fn = _compiled.get(name)
    if compiled_fn is None:
        if not _compiled and _fresh_cache_dir is None:
            _writable_cache()
        # raised once, never lowered: past the limit dynamo would quietly run the formula eagerly on whole
        # tensors (fp32 temporaries the size of the tensor)
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
        compiled_fn = _compiled[name] = torch.compile(fn, dynamic=True)
    with torch.no_grad():  # grad mode is part of dynamo's guards: always the same, one graph
        return compiled_fn(*args, **kw)


@functools.lru_cache(maxsize=64)
def _keys(seed: int, T: int) -> torch.Tensor:
    return torch.tensor([s32(task_key(seed, t)) for t in range(T)], dtype=torch.int32)


def started() -> bool:
    """True once this process has compiled (or loaded from the cache) a formula: the start-up is paid."""
    return bool(_compiled)


def available() -> bool:
    """False once torch.compile has failed in this process (the dispatch then uses the eager backend)."""
    return _broken is None


def _fresh_cache() -> bool:
    """Point Inductor at a new empty cache directory and forget the compiled functions: a compile that fails
    is most often a poisoned cache (a 0-byte .so left by a process killed while compiling) or an unwritable
    one. False when this process already did so (then the eager path takes over)."""
    global _fresh_cache_dir
    if _fresh_cache_dir is not None:
        return False
    try:
        _fresh_cache_dir = tempfile.mkdtemp(prefix="blockmerge-inductor-")
    except OSError:
        _fresh_cache_dir = ""
        return False
    atexit.register(shutil.rmtree, _fresh_cache_dir, True)  # this process's own: no leftover in /tmp
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _fresh_cache_dir
    _compiled.clear()
    try:
        torch._dynamo.reset()
    except Exception:  # a compiler that failed while importing cannot be reset: the retry will tell
        pass
    return True


def _run(run):
    """run() on the compiled path; after a failure once more with a fresh cache (`_fresh_cache`); None when
    that fails too: `_fallback` has then switched this process to the eager path, with one warning."""
    try:
        return run()
    except Exception as err:
        first = err
    if _fresh_cache():
        try:
            return run()
        except Exception as err:
            first = err
    _fallback(first)
    return None


def _fallback(err: Exception) -> None:
    global _broken
    _broken = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    retried = f" (also with a fresh cache {_fresh_cache_dir})" if _fresh_cache_dir else ""
    warnings.warn(
        f"blockmerge: torch.compile cannot build the CPU kernels{retried}: {_broken[:300]}; using the eager "
        "torch path (slower). Install a C++ compiler, or set BLOCKMERGE_KERNELS=torch to silence this.",
        RuntimeWarning,
        stacklevel=5,  # the caller of kernels.combine / project
    )


def combine_compiled(base: torch.Tensor, experts: Sequence[torch.Tensor], weights, **options) -> torch.Tensor:
    """Fused combine; options and semantics as spec.combine_spec."""
    return combine_fused(base, experts, combine_spec(base, experts, weights, **options))


def combine_fused(base: torch.Tensor, experts: Sequence[torch.Tensor], spec: CombineSpec) -> torch.Tensor:
    """combine for a checked spec in compiled calls (the eager backend when torch.compile is unavailable)."""
    T, n = spec.T, base.numel()
    if T == 0 or n == 0 or not available():
        return combine_eager(base, experts, spec)
    if spec.simple:  # every input one multiply-add: base_coef*b + sum scale*w*e
        head, w = [spec.base_coef, 1.0, 1.0], [spec.scale * v for v in spec.weights]
    else:
        head, w = [spec.base_weight, spec.scale, spec.div_const], list(spec.weights)
    thr = list(spec.thresholds or [0.0] * T)
    coef = torch.tensor(head + w + list(spec.drop_p) + list(spec.keep_scale) + thr, dtype=torch.float32)
    keys = _keys(spec.seed, T)
    flags = dict(
        dare=tuple(v > 0 for v in spec.drop_p), trim=spec.thresholds is not None, sign=spec.sign_consensus,
        normalize=spec.normalize, simple=spec.simple, out_dtype=spec.out_dtype,
    )  # fmt: skip
    b, es = base.reshape(-1), [e.reshape(-1) for e in experts]
    # the output is allocated here, not by Inductor, so that it gets huge pages before its first touch
    # (4 KiB page faults doubled the time of a 64M-element fp32 combine); the loop writes into it directly
    out = new_output(base.shape, spec.out_dtype, base.device)
    flat = out.view(-1)

    def run():
        for s in range(0, n, CALL_MAX):  # one call unless the int32 DARE counter would overflow
            stop, off = min(s + CALL_MAX, n), torch.tensor(s32(spec.offset + s), dtype=torch.int32)
            _call("combine", combine_into, flat[s:stop], b[s:stop], [e[s:stop] for e in es], coef, keys, off, **flags)
        return out

    res = _run(run)  # None: compiler missing or broken (the inputs were checked above)
    return combine_eager(base, experts, spec) if res is None else res


def project_compiled(grad: torch.Tensor, base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """g_t = <grad, expert_t - base> for every task, fp32 [T]; see eager.project_torch."""
    check_project(grad, base, experts)
    T, n = len(experts), grad.numel()
    if T == 0 or n == 0 or not available():
        return project_torch(grad, base, experts)
    g, b = grad.reshape(-1), base.reshape(-1)
    es = [e.reshape(-1) for e in experts]
    # fp32 sums of fixed-size chunks added in fp64 in order: accurate and deterministic
    parts = _run(lambda: [
        _call("project", project_formula, g[s : s + PROJECT_CHUNK], b[s : s + PROJECT_CHUNK],
              [e[s : s + PROJECT_CHUNK] for e in es])
        for s in range(0, n, PROJECT_CHUNK)
    ])  # fmt: skip
    if parts is None:
        return project_torch(grad, base, experts)
    return torch.stack(parts).double().sum(0).float()
