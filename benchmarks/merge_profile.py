"""Where a static merge's time goes: each step of merging one decoder-layer block of the synthetic family
(base + experts), timed alone in CPU seconds of one thread (robust on a shared machine, where wall time
mostly measures waiting for a core), and scaled to the whole model by the block's share of the bytes.

    nice -n 10 python benchmarks/merge_profile.py                # the 1.1B family of merge_throughput.py
    python benchmarks/merge_profile.py --root /tmp/tiny --shape tiny --experts 2

Steps: first touch of the memory-mapped inputs (page faults), the NaN/Inf check of every input (the one
blockmerge runs and the bool-tensor check it replaced), converting the inputs to fp32 whole (what an unfused
formula pays), the combine of linear/task_arithmetic (eager with the compiled rounding, the fused-multiply-add
eager path, the compiled loop), TIES's top-k thresholds and its compiled combine, writing the output block.
torch.compile's start-up is timed in wall seconds (its first call in this process, cached kernels).
Writes benchmarks/out/merge_profile.csv."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("BLOCKMERGE_CPU_THREADS", "1")  # one thread: CPU seconds of one core per step


def cpu_seconds(fn, reps: int) -> float:
    fn()
    t = time.thread_time()
    for _ in range(reps):
        fn()
    return (time.thread_time() - t) / reps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="/tmp/synth1b", help="family folder (base, expert0..), reused if DONE exists")
    ap.add_argument("--shape", default="1b", help="synthetic family: 1b or tiny")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2, help="timed repetitions per step (after one untimed)")
    ap.add_argument("--no-compiled", action="store_true", help="skip the torch.compile steps (a smoke run)")
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "out"))
    args = ap.parse_args(argv)

    import torch
    from blockmerge.io.checkpoint import Checkpoint, _all_finite
    from blockmerge.io.report import write_csv
    from blockmerge.io.writer import ShardFiles, plan_shards
    from blockmerge.kernels import combine_spec, compiled
    from blockmerge.kernels.eager import combine_eager, combine_simple_rounded, magnitude_thresholds
    from blockmerge.suite.synth import ensure_synthetic_llama

    torch.set_num_threads(1)
    base, experts = ensure_synthetic_llama(args.root, n_experts=args.experts, shape=args.shape)
    models = [Checkpoint(p) for p in (base, *experts)]
    blocks = models[0].blocks()
    block = next(b for b in blocks if b.layer is not None)
    names = block.tensors
    scale = models[0].nbytes / sum(models[0].tensors[n].nbytes for n in names)  # whole model / this block
    ts = [{n: m.get(n) for n in names} for m in models]
    T, w = len(experts), [1.0 / len(experts)] * len(experts)

    def inputs(n):
        return ts[0][n], [t[n] for t in ts[1:]]

    simple = {n: combine_spec(*inputs(n), w, base_weight=1.0, out_dtype=ts[0][n].dtype) for n in names}
    ties = {n: combine_spec(*inputs(n), w, sign_consensus=True, thresholds=[1e-3] * T) for n in names}
    outs = {n: combine_simple_rounded(*inputs(n), simple[n]) for n in names}

    def touch():
        for m in models:
            m.release()
            for n in names:
                m.get(n).view(-1)[::1024].sum()

    work = Path(tempfile.mkdtemp(prefix="bm_profile_"))
    plan = [(n, tuple(outs[n].shape), outs[n].dtype) for n in names]

    def write():
        files = ShardFiles(work, plan_shards(plan, 1 << 62, {}), create=True)
        for n in names:
            files.write(n, outs[n])
        files.close()

    steps = [
        ("page faults: first touch of the mmapped inputs", touch),
        ("NaN/Inf check: aminmax (blockmerge)", lambda: [_all_finite(t[n]) for t in ts for n in names]),
        ("NaN/Inf check: isfinite().all()", lambda: [bool(torch.isfinite(t[n]).all()) for t in ts for n in names]),
        ("bf16 -> fp32 conversion of whole inputs", lambda: [t[n].float() for t in ts for n in names]),
        ("combine linear: eager, compiled rounding", lambda: [combine_simple_rounded(*inputs(n), simple[n])
                                                              for n in names]),
        ("combine linear: eager, fused multiply-add", lambda: [combine_eager(*inputs(n), simple[n]) for n in names]),
        ("combine linear: compiled", lambda: [compiled.combine_fused(*inputs(n), simple[n]) for n in names]),
        ("ties: top-k thresholds (density 0.5)", lambda: [magnitude_thresholds(*inputs(n), [0.5] * T) for n in names]),
        ("ties: compiled combine", lambda: [compiled.combine_fused(*inputs(n), ties[n]) for n in names]),
        ("write the output block (pwrite)", write),
    ]  # fmt: skip
    rows = []
    if args.no_compiled:
        steps = [(label, fn) for label, fn in steps if "compiled" not in label or "rounding" in label]
    else:
        t0 = time.perf_counter()
        compiled.combine_fused(*inputs(names[0]), simple[names[0]])
        startup = round(time.perf_counter() - t0, 2)
        rows.append({"step": "torch.compile start-up (wall s, first call)", "block_cpu_ms": "", "model_s": startup})
    for label, fn in steps:
        s = cpu_seconds(fn, args.reps)
        rows.append({"step": label, "block_cpu_ms": round(s * 1e3, 1), "model_s": round(s * scale, 2)})
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    load = os.getloadavg()[0]
    print(
        f"block {block.name} of {len(blocks)}, {len(models)} models; whole model = {scale:.1f} x the block; "
        f"load {load:.1f}"
    )
    for r in rows:
        print(f"  {r['step']:48s} {r['block_cpu_ms']!s:>9} CPU-ms/block {r['model_s']:8.2f} s/model")
    path = Path(args.out_dir) / "merge_profile.csv"
    write_csv(path, [{**r, "load1": round(load, 2)} for r in rows])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
