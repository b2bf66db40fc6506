"""Kernels: the Triton kernels (run by the Triton interpreter on CPU) against the torch reference, the
reference against a naive formula, the DARE mask on both paths, and the dispatch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import blockmerge.kernels as K
import pytest
import torch
from blockmerge.kernels import compiled as C
from blockmerge.kernels import cpu as CPU
from blockmerge.kernels import eager as E
from blockmerge.kernels import spec as S

triton = pytest.importorskip("triton")

TOL = {  # (rtol, atol) per output dtype: fp32 rounding order; 1 ulp for the 16-bit formats
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2.0**-10, 1e-3),
    torch.bfloat16: (2.0**-7, 1e-2),
}


# Triton's interpreter must be chosen before triton is first imported (its standard library, e.g. tl.zeros,
# is decorated at import time). So the Triton-path tests (marked `interp`) run here only when this process was
# started with TRITON_INTERPRET=1; otherwise tests/conftest.py deselects them and test_triton_kernels_in_child_process
# runs them in a child pytest with that variable set, and the rest of the session keeps the normal Triton.
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

INTERPRETED = isinstance(triton.language.zeros, InterpretedFunction)
interp = pytest.mark.interp
if INTERPRETED:
    from blockmerge.kernels import triton_kernels as TK

    assert TK.INTERPRET


@pytest.mark.skipif(INTERPRETED, reason="this is the child")
def test_triton_kernels_in_child_process():
    """All Triton kernels under the interpreter on CPU tensors against the torch reference (child pytest)."""
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", __file__, "-m", "interp"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    tail = (r.stdout + r.stderr)[-6000:]
    assert r.returncode == 0, tail
    summary = r.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, tail
    assert int(summary.split(" passed")[0].split()[-1]) >= 50, tail  # every interp test ran, none silently lost


def _close(a: torch.Tensor, b: torch.Tensor, dtype=None) -> None:
    rtol, atol = TOL[dtype or a.dtype]
    torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol)


def _inputs(shape, dtype, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    experts = [(base + 0.05 * torch.randn(shape, generator=g)).to(dtype) for _ in range(T)]
    weights = (0.2 + 0.8 * torch.rand(T, generator=g)).tolist()
    return base.to(dtype), experts, weights


def _naive(
    base,
    experts,
    w,
    *,
    base_weight=1.0,
    scale=1.0,
    drop_p=None,
    rescale=True,
    seed=0,
    offset=0,
    thresholds=None,
    sign_consensus=False,
    normalize=False,
    out_dtype=None,
):
    """The spec.py docstring formula written directly on stacked fp32 task vectors."""
    T = len(experts)
    b = base.reshape(-1).float()
    tau = torch.stack([e.reshape(-1).float() - b for e in experts])
    p = [0.0] * T if drop_p is None else ([drop_p] * T if isinstance(drop_p, float) else list(drop_p))
    for t in range(T):
        if p[t] > 0:
            keep = S.dare_keep(seed, t, p[t], offset, b.numel())
            tau[t] = torch.where(keep, tau[t] / (1 - p[t]) if rescale else tau[t], 0.0)
        if thresholds is not None:
            tau[t] = torch.where(tau[t].abs() >= thresholds[t], tau[t], 0.0)
    wt = torch.tensor(w, dtype=torch.float32)[:, None]
    x = tau * wt
    if sign_consensus:
        elected = torch.where(x.sum(0) >= 0, 1.0, -1.0)
        agree = torch.sign(x) == elected
        mix = (x * agree).sum(0)
        div = (agree * wt).sum(0)
        div = torch.where(div == 0, 1.0, div)
    else:
        mix = x.sum(0)
        div = sum(w) if abs(sum(w)) >= 1e-8 else 1.0
    if normalize:
        mix = mix / div
    out = b * base_weight + scale * mix
    return out.reshape(base.shape).to(out_dtype or base.dtype)


OPTIONS = {
    "plain": {},
    "normalize": {"normalize": True},
    "scaled": {"base_weight": 0.7, "scale": 1.3},
    "dare": {"drop_p": 0.3, "seed": 7, "offset": 123},
    "dare_norescale": {"drop_p": 0.5, "rescale": False, "seed": 1},
    "ties": {"thresholds": "auto", "sign_consensus": True, "normalize": True},
    "ties_nonorm": {"thresholds": "auto", "sign_consensus": True},
    "trim_only": {"thresholds": "auto"},
    "dare_ties": {"drop_p": 0.2, "seed": 3, "sign_consensus": True, "normalize": True, "offset": 4096},
    "out_fp32": {"out_dtype": torch.float32, "scale": 0.5},
}
SHAPES = [(7,), (1023,), (4097,), (3, 129)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _kwargs(opt, base, experts):
    kw = dict(OPTIONS[opt])
    if kw.get("thresholds") == "auto":
        kw["thresholds"] = E.magnitude_thresholds(base, experts, [0.5] * len(experts))
    return kw


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt", list(OPTIONS))
@interp
def test_interp_combine_matches_torch(opt, dtype):
    i = list(OPTIONS).index(opt) + DTYPES.index(dtype)
    _compare_combine(TK.combine_triton, opt, [(dtype, T) for T in (1, 2, 3, 5)], i)


def _compare_combine(fn, opt: str, cases, i: int, seed0: int = 0) -> None:
    """fn against the eager reference for option set `opt`, one (dtype, T) case per odd shape."""
    for k, (dtype, T) in enumerate(cases):
        shape = SHAPES[(i + k) % len(SHAPES)]
        base, experts, w = _inputs(shape, dtype, T, seed=seed0 + i * 10 + k)
        kw = _kwargs(opt, base, experts)
        ref = E.combine_torch(base, experts, w, **kw)
        got = fn(base, experts, w, **kw)
        assert got.dtype == ref.dtype and got.shape == ref.shape
        _close(got, ref)


@pytest.mark.parametrize("opt", ["plain", "dare", "ties", "dare_ties"])
@interp
def test_interp_combine_more_experts_than_one_launch(opt):
    """T > MAX_T: groups of MAX_T carry the running sums through the fp32 scratch buffer."""
    T = TK.MAX_T + 3
    base, experts, w = _inputs((1000,), torch.float32, T, seed=5)
    kw = _kwargs(opt, base, experts)
    _close(TK.combine_triton(base, experts, w, **kw), E.combine_torch(base, experts, w, **kw))


@interp
def test_interp_combine_weights_as_tensor_and_negative():
    base, experts, _ = _inputs((513,), torch.float32, 3)
    w = torch.tensor([0.5, -0.25, 1.5])
    _close(TK.combine_triton(base, experts, w), E.combine_torch(base, experts, w))
    _close(TK.combine_triton(base, [], []), base)


@interp
def test_interp_mixed_dtypes_and_strided_inputs():
    g = torch.Generator().manual_seed(8)
    base = torch.randn(64, 40, generator=g)
    experts = [(base + 0.1 * torch.randn(64, 40, generator=g)).bfloat16() for _ in range(3)]
    bt, et = base.t(), [e.t() for e in experts]  # non-contiguous views, fp32 base with bf16 experts
    kw = {"thresholds": [0.05] * 3, "sign_consensus": True, "out_dtype": torch.bfloat16}
    _close(TK.combine_triton(bt, et, [0.3, 0.3, 0.4], **kw), E.combine_torch(bt, et, [0.3, 0.3, 0.4], **kw))
    grad = torch.randn(40, 64, generator=g)
    torch.testing.assert_close(TK.project_triton(grad, bt, et), E.project_torch(grad, bt, et), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opt", list(OPTIONS))
def test_reference_matches_naive_formula(opt, monkeypatch):
    """The chunked, threaded CPU path against the formula (n spans several chunks and uses the pool)."""
    monkeypatch.setenv("BLOCKMERGE_CPU_THREADS", "2")
    base, experts, w = _inputs((2 * CPU.CHUNK + 77,), torch.float32, 3, seed=11)
    kw = _kwargs(opt, base, experts)
    got = E.combine_torch(base, experts, w, **kw)
    _close(got, _naive(base, experts, w, **kw))
    monkeypatch.setenv("BLOCKMERGE_CPU_THREADS", "1")
    assert torch.equal(E.combine_torch(base, experts, w, **kw), got)  # elementwise: chunking-independent


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_16bit_inputs(dtype):
    base, experts, w = _inputs((70001,), dtype, 4, seed=2)
    _close(E.combine_torch(base, experts, w), _naive(base, experts, w))
    w1 = [0.125, 0.375, 0.25, 0.25]  # sums to 1: the base coefficient is 0 and base is not read
    _close(E.combine_torch(base, experts, w1), _naive(base, experts, w1))
    out32 = E.combine_torch(base, experts, w, out_dtype=torch.float32)
    _close(out32, _naive(base, experts, w, out_dtype=torch.float32))  # fp32 accumulation, no 16-bit rounding


@pytest.mark.parametrize("offset", [0, 5, 2**32 - 700])
@interp
def test_interp_dare_mask_identical_on_both_paths(offset):
    """base 0, experts 1, weights 2^t, no rescale: out = sum_t 2^t keep_t encodes every task's mask exactly."""
    n, T, p, seed = 2051, 3, [0.3, 0.5, 0.9], 42
    base = torch.zeros(n)
    experts = [torch.ones(n)] * T
    w = [1.0, 2.0, 4.0]
    kw = dict(drop_p=p, rescale=False, seed=seed, offset=offset)
    tri = TK.combine_triton(base, experts, w, **kw)
    ref = E.combine_torch(base, experts, w, **kw)
    want = sum(S.dare_keep(seed, t, p[t], offset, n).float() * w[t] for t in range(T))
    assert torch.equal(tri, want)
    assert torch.equal(ref, want)
    for t in range(T):  # each task kept about 1 - p of the elements
        kept = ((want.to(torch.int64) >> t) & 1).float().mean().item()
        assert abs(kept - (1 - p[t])) < 0.05


@pytest.mark.parametrize("start", [0, 2**31 - 333, 2**32 - 1000, 2**33 + 7])
def test_fast_chunk_hash_is_bit_identical(start):
    """The int32 hash used inside the CPU combine equals the int64 spec, across 2^31 / 2^32 and odd tails."""
    m = 1003
    for key in (S.task_key(0, 0), S.task_key(5, 3), 0xFFFFFFFF, 0):
        got = E.hash_uniform_chunk(key, start, m, torch.empty(m))
        assert torch.equal(got, S.hash_uniform(key, torch.arange(start, start + m)))


def test_hash_is_counter_based():
    idx = torch.arange(1000, 3000)
    u = S.hash_uniform(S.task_key(3, 1), idx)
    assert torch.equal(u[500:700], S.hash_uniform(S.task_key(3, 1), idx[500:700]))
    assert 0.0 <= u.min().item() and u.max().item() < 1.0
    assert not torch.equal(u, S.hash_uniform(S.task_key(3, 2), idx))
    # known values pin the hash (lowbias32) so no path can drift
    x = (5 ^ S.task_key(0, 0)) & 0xFFFFFFFF
    for sh, m in ((16, S.M1), (15, S.M2)):
        x = ((x ^ (x >> sh)) * m) & 0xFFFFFFFF
    x ^= x >> 16
    assert S.hash_uniform(S.task_key(0, 0), torch.tensor([5])).item() == (x >> 8) / 2**24


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 3, 5, 10])
@interp
def test_interp_project_matches(dtype, T):
    shape = SHAPES[(T + DTYPES.index(dtype)) % len(SHAPES)]
    base, experts, _ = _inputs(shape, dtype, T, seed=T)
    grad = torch.randn(shape).to(dtype)
    exact = torch.stack([(grad.double() * (e.double() - base.double())).sum() for e in experts]).float()
    tri = TK.project_triton(grad, base, experts)
    ref = E.project_torch(grad, base, experts)
    assert tri.dtype == ref.dtype == torch.float32 and tri.shape == (T,)
    torch.testing.assert_close(tri, exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref, exact, rtol=1e-5, atol=1e-5)


def test_project_reference_large_is_deterministic(monkeypatch):
    base, experts, _ = _inputs((3 * CPU.CHUNK + 3,), torch.bfloat16, 3, seed=9)
    grad = torch.randn(base.shape).to(torch.bfloat16)
    exact = torch.stack([(grad.double() * (e.double() - base.double())).sum() for e in experts]).float()
    monkeypatch.setenv("BLOCKMERGE_CPU_THREADS", "2")
    a = E.project_torch(grad, base, experts)
    assert torch.equal(a, E.project_torch(grad, base, experts))
    torch.testing.assert_close(a, exact, rtol=1e-5, atol=1e-4)


def test_large_output_with_hugepage_hint(monkeypatch):
    monkeypatch.setattr(CPU, "HUGE_MIN", 1 << 16)  # exercise the madvise path on a small tensor
    base, experts, w = _inputs((3 * CPU.GRAIN + 5,), torch.float32, 2, seed=3)
    want = _naive(base, experts, w)
    _close(E.combine_torch(base, experts, w), want)
    monkeypatch.setenv("BLOCKMERGE_HUGEPAGES", "0")
    _close(E.combine_torch(base, experts, w), want)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_pool_survives_fork():
    base, experts, w = _inputs((4 * CPU.GRAIN,), torch.float32, 2)
    want = E.combine_torch(base, experts, w)  # starts the pool in this process
    pid = os.fork()
    if pid == 0:  # child: a fresh pool (the parent's threads do not exist here)
        import faulthandler

        faulthandler.dump_traceback_later(60, exit=True)
        torch.set_num_threads(1)  # libgomp (torch's own OpenMP) is not fork-safe: keep it out of the child
        os.environ["BLOCKMERGE_CPU_THREADS"] = "2"
        ok = torch.equal(E.combine_torch(base, experts, w), want)
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_magnitude_thresholds_topk():
    base, experts, _ = _inputs((10007,), torch.float32, 2, seed=4)
    thr = E.magnitude_thresholds(base, experts, [0.3, 1.0])
    mag = (experts[0] - base).abs()
    assert thr[0] == mag.topk(int(0.3 * mag.numel())).values[-1].item()
    assert thr[1] == 0.0
    assert E.magnitude_thresholds(base, experts[:1], [0.0]) == [float("inf")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_magnitude_thresholds_radix_select_is_exact(dtype, monkeypatch):
    """The two-pass radix select over pool chunks equals a sort, with many ties (bf16), tiny and huge
    magnitudes, zeros, and any density."""
    monkeypatch.setenv("BLOCKMERGE_CPU_THREADS", "2")
    n = 3 * CPU.CHUNK + 5
    base, experts, _ = _inputs((n,), dtype, 1, seed=6)
    e = experts[0].clone()
    e[:1000] = base[:1000]  # zero deltas
    e[1000:1010] = (base[1000:1010].float() + 1e30).to(dtype)
    e[1010:1020] = (base[1010:1020].float() + 1e-30).to(dtype)
    mag = (e.float() - base.float()).abs().sort(descending=True).values
    for d in (2e-6, 1e-5, 0.01, 0.3, 0.5, 0.77, 0.999, 1 - 1e-5):
        k = int(d * n)
        assert E.magnitude_thresholds(base, [e], [d]) == [mag[k - 1].item()], d


def test_dispatch(monkeypatch):
    from types import SimpleNamespace

    import blockmerge.kernels.triton_kernels as real

    cpu = torch.zeros(3)
    monkeypatch.delenv("BLOCKMERGE_KERNELS", raising=False)
    monkeypatch.setattr(C, "_broken", None)
    assert K.backend(cpu) == "torch"  # small: the eager path (no torch.compile start-up)
    assert K.backend(torch.empty(C.MIN_NUMEL)) == "compiled"
    monkeypatch.setattr(C, "MIN_NUMEL", 1)
    assert K.backend(cpu) == "compiled"
    assert K.backend(SimpleNamespace(is_cuda=True)) == "triton"
    calls = []
    fakes = ((real, "combine_triton"), (real, "project_triton"), (C, "combine_fused"), (C, "project_compiled"))
    for mod, name in fakes:
        monkeypatch.setattr(mod, name, lambda *a, name=name, **k: calls.append(name) or name)
    base, experts, w = _inputs((5,), torch.float32, 2)
    monkeypatch.setattr(C, "_compiled", {})  # the compiler has not started in this process
    monkeypatch.setattr(K, "_eager_simple_bytes", 0)
    simple = K.combine(base, experts, w)  # one multiply-add per input: eager with the compiled rounding
    assert torch.equal(simple, K.combine_simple_rounded(base, experts, K.combine_spec(base, experts, w)))
    assert K._eager_simple_bytes == 3 * 5 * 4 and calls == []
    monkeypatch.setattr(K, "EAGER_SIMPLE_BYTES", K._eager_simple_bytes)  # past it: the compiler pays off
    assert K.combine(base, experts, w) == "combine_fused"
    calls.clear()
    assert K.combine(base, experts, w, sign_consensus=True) == "combine_fused"
    assert K.project(base, base, experts) == "project_compiled"
    assert calls == ["combine_fused", "project_compiled"]
    calls.clear()
    monkeypatch.setattr(C, "_broken", "no compiler")  # torch.compile failed earlier: the eager reference
    assert K.backend(cpu) == "torch"
    assert isinstance(K.combine(base, experts, w), torch.Tensor)
    assert isinstance(K.project(base, base, experts), torch.Tensor)
    assert calls == []  # neither reached the compiler
    monkeypatch.setenv("BLOCKMERGE_KERNELS", "triton")  # forced either way
    assert K.backend(cpu) == "triton"
    assert K.combine(base, experts, w, normalize=True) == "combine_triton"
    assert K.project(base, base, experts) == "project_triton"
    assert calls == ["combine_triton", "project_triton"]
    monkeypatch.setenv("BLOCKMERGE_KERNELS", "torch")
    assert K.backend(SimpleNamespace(is_cuda=True)) == "torch"
    monkeypatch.setenv("BLOCKMERGE_KERNELS", "eager")  # the eager backend's own name, the same path
    assert K.backend(SimpleNamespace(is_cuda=True)) == "torch"
    monkeypatch.setenv("BLOCKMERGE_KERNELS", "compiled")
    assert K.backend(SimpleNamespace(is_cuda=True)) == "compiled"
    monkeypatch.setenv("BLOCKMERGE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="BLOCKMERGE_KERNELS"):
        K.backend(cpu)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    import blockmerge.kernels.triton_kernels as real

    monkeypatch.setattr(real, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        real.combine_triton(torch.zeros(4), [torch.ones(4)], [1.0])


@interp
def test_interp_bad_arguments():
    base, experts, _ = _inputs((8,), torch.float32, 2)
    for fn in (E.combine_torch, TK.combine_triton):
        with pytest.raises(ValueError, match="weights"):
            fn(base, experts, [1.0])
        with pytest.raises(ValueError, match="shape"):
            fn(base, [experts[0], torch.zeros(9)], [1.0, 1.0])


def test_kernels_compile_for_sm90():
    """The interpreter does not type-check like the compiler: compile the real kernels ahead of time for an
    H100 (no GPU needed: Triton's bundled ptxas)."""
    from triton.backends.nvidia import compiler as nv  # noqa: F401

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("no bundled ptxas")
    script = textwrap.dedent(
        """
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from blockmerge.kernels import triton_kernels as K
        tgt = GPUTarget("cuda", 90, 32)
        sig = {"base_ptr": "*bf16", "e_ptrs": ("*bf16",) * 3, "out_ptr": "*bf16", "acc_ptr": "*fp32",
               "par_ptr": "*fp32", "key_ptr": "*i32", "n": "i32", "offset": "i64", "base_weight": "fp32",
               "scale": "fp32", "div_const": "fp32"}
        for k in ("T", "DARE", "RESCALE", "TRIM", "SIGN", "NORMALIZE", "FIRST", "LAST", "BLOCK"):
            sig[k] = "constexpr"
        for first, last in ((True, True), (False, False)):
            cs = dict(T=3, DARE=True, RESCALE=True, TRIM=True, SIGN=True, NORMALIZE=True, FIRST=first,
                      LAST=last, BLOCK=K.BLOCK_COMBINE)
            assert triton.compile(ASTSource(K._combine_kernel, sig, cs), target=tgt).asm["cubin"]
        sig = {"grad_ptr": "*fp32", "base_ptr": "*bf16", "e_ptrs": ("*bf16",) * 5, "part_ptr": "*fp32",
               "n": "i32", "T": "constexpr", "TP": "constexpr", "BLOCK": "constexpr"}
        cs = dict(T=5, TP=8, BLOCK=K.BLOCK_PROJECT)
        assert triton.compile(ASTSource(K._project_kernel, sig, cs), target=tgt).asm["cubin"]
        print("OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------
# the compiled CPU path (torch.compile of the formulas, the CPU default) against the eager reference

COMPILED_CASES = [(torch.float32, 1), (torch.bfloat16, 3), (torch.float16, 5)]  # one graph each per option


@pytest.fixture
def compiled_on(monkeypatch):
    """torch.compile works in this process (a fallback test elsewhere may have turned it off)."""
    monkeypatch.setattr(C, "_broken", None)
    monkeypatch.delenv("BLOCKMERGE_KERNELS", raising=False)


@pytest.mark.parametrize("opt", list(OPTIONS))
def test_compiled_combine_matches_torch(opt, compiled_on):
    _compare_combine(C.combine_compiled, opt, COMPILED_CASES, list(OPTIONS).index(opt), seed0=100)
    assert C.available()  # compiled for real, no silent fallback


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_simple_combine_rounds_like_the_compiled_kernel(dtype, compiled_on):
    """linear / task_arithmetic skip the compiler: the eager path gives the compiled kernel's bits."""
    n = 300_001  # more than one chunk, an uneven tail
    base, experts, _ = _inputs((n,), dtype, 3, seed=7)
    for w, kw in (([0.3, 0.5, 0.2], dict(scale=0.7)), ([1 / 3] * 3, dict(base_weight=0.0, out_dtype=torch.float32))):
        spec = K.combine_spec(base, experts, w, **kw)
        assert spec.simple
        want = C.combine_fused(base, experts, spec).view(torch.uint8)
        assert torch.equal(K.combine_simple_rounded(base, experts, spec).view(torch.uint8), want)
        assert torch.equal(K.combine(base, experts, w, **kw).view(torch.uint8), want)  # the default dispatch
    assert C.available()


def test_compiled_hash_is_bit_identical():
    """The int32 hash inside the compiled combine equals the int64 spec across 2^31 and 2^32."""
    for start in (0, 2**31 - 333, 2**32 - 1000):
        idx = torch.arange(start, start + 1003)
        idx32 = torch.tensor([S.s32(v) for v in idx.tolist()], dtype=torch.int32)
        for key in (S.task_key(0, 0), S.task_key(5, 3), 0xFFFFFFFF, 0):
            got = C.hash_uniform32(torch.tensor(S.s32(key), dtype=torch.int32), idx32)
            assert torch.equal(got, S.hash_uniform(key, idx))


@pytest.mark.parametrize("call_max", [None, 1000])
def test_compiled_dare_mask_identical(call_max, compiled_on, monkeypatch):
    """The mask encoding of test_interp_dare_mask_identical_on_both_paths, offsets crossing 2^32, and a
    tensor split into several calls (CALL_MAX) keeps each element's counter."""
    if call_max:
        monkeypatch.setattr(C, "CALL_MAX", call_max)
    n, T, p, seed, w = 2051, 3, [0.3, 0.5, 0.9], 42, [1.0, 2.0, 4.0]
    for offset in (0, 5, 2**32 - 700):
        kw = dict(drop_p=p, rescale=False, seed=seed, offset=offset)
        got = C.combine_compiled(torch.zeros(n), [torch.ones(n)] * T, w, **kw)
        want = sum(S.dare_keep(seed, t, p[t], offset, n).float() * w[t] for t in range(T))
        assert torch.equal(got, want)
    assert C.available()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_project_matches(dtype, compiled_on, monkeypatch):
    monkeypatch.setattr(C, "PROJECT_CHUNK", 1000)  # several chunks summed in fp64
    for T, shape in ((1, (7,)), (3, (4097,)), (10, (3, 1029))):
        base, experts, _ = _inputs(shape, dtype, T, seed=T)
        grad = torch.randn(shape).to(dtype)
        exact = torch.stack([(grad.double() * (e.double() - base.double())).sum() for e in experts]).float()
        got = C.project_compiled(grad, base, experts)
        assert got.dtype == torch.float32 and got.shape == (T,)
        torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5)
        assert torch.equal(got, C.project_compiled(grad, base, experts))  # deterministic
    assert C.available()


def test_compiled_writes_into_a_hugepage_output(compiled_on, monkeypatch):
    """The compiled combine stores into an output it allocated and hinted (not Inductor's buffer), for the
    plain and the option-heavy graphs, whole or split into several calls."""
    monkeypatch.setattr(CPU, "HUGE_MIN", 1 << 12)  # exercise the madvise path on a small tensor
    hinted = []
    hint = CPU.madvise_hugepages
    monkeypatch.setattr(CPU, "madvise_hugepages", lambda t: (hinted.append(t.numel()), hint(t)))
    base, experts, w = _inputs((33, 129), torch.bfloat16, 3, seed=11)
    ties = {"thresholds": [0.01] * 3, "sign_consensus": True, "normalize": True, "drop_p": 0.3, "seed": 2}
    for call_max in (C.CALL_MAX, 1000):
        monkeypatch.setattr(C, "CALL_MAX", call_max)
        for kw in ({}, ties):
            want = E.combine_torch(base, experts, w, **kw)
            hinted.clear()
            got = C.combine_compiled(base, experts, w, **kw)
            assert hinted == [base.numel()]  # one hinted output per call, whole or split
            assert got.shape == base.shape and got.is_contiguous()
            _close(got, want)
    assert C.available()


def test_compiled_mixed_dtypes_and_strided_inputs(compiled_on):
    g = torch.Generator().manual_seed(8)
    base = torch.randn(64, 40, generator=g)
    experts = [(base + 0.1 * torch.randn(64, 40, generator=g)).bfloat16() for _ in range(3)]
    bt, et = base.t(), [e.t() for e in experts]  # non-contiguous views, fp32 base with bf16 experts
    kw = {"thresholds": [0.05] * 3, "sign_consensus": True, "out_dtype": torch.bfloat16}
    got = C.combine_compiled(bt, et, [0.3, 0.3, 0.4], **kw)
    assert got.shape == bt.shape
    _close(got, E.combine_torch(bt, et, [0.3, 0.3, 0.4], **kw))
    grad = torch.randn(40, 64, generator=g)
    torch.testing.assert_close(C.project_compiled(grad, bt, et), E.project_torch(grad, bt, et), rtol=1e-5, atol=1e-5)
    _close(C.combine_compiled(base, [], []), base)  # no experts: base_weight * base
    with pytest.raises(ValueError, match="weights"):
        C.combine_compiled(base, experts, [1.0])
    with pytest.raises(ValueError, match="shape"):
        C.combine_compiled(base, [experts[0], torch.zeros(9)], [1.0, 1.0])
    assert C.available()


def test_compiled_falls_back_to_eager_with_a_warning(tmp_path):
    """A failing compiler (here: none at all, in a child process) gives one clear warning and the eager
    reference's result; the dispatch then stays on the eager path."""
    script = textwrap.dedent(
        """
        import warnings, torch
        from blockmerge import kernels as K
        K.compiled.MIN_NUMEL = 1  # small tensors too
        b = torch.randn(1000); es = [b + 1, b + 2]
        assert K.backend(b) == "compiled"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = K.combine(b, es, [0.5, 0.5])
            g = K.project(b, b, es)
        assert torch.allclose(out, b + 1.5) and torch.allclose(g, b.sum() * torch.tensor([1.0, 2.0]), atol=1e-3)
        msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(msgs) == 1 and "torch.compile cannot build" in msgs[0] and "C++ compiler" in msgs[0], msgs
        assert K.backend(b) == "torch" and not K.compiled.available()
        print("OK")
        """
    )
    # an empty Inductor cache: a cached kernel would not need the compiler
    env = dict(os.environ, CXX="/nonexistent/g++", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    env.pop("BLOCKMERGE_KERNELS", None)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, (r.stdout + r.stderr)[-3000:]
