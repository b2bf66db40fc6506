"""Throughput and memory of `blockmerge merge` on a synthetic ~1.1B-parameter Llama (bf16) with 3 experts,
next to the I/O floor (plain sequential reading of the same input files) measured in the same run.

    nice -n 10 python benchmarks/merge_throughput.py     # linear, ties, dare_ties (density 0.5); kernels auto, torch
    python benchmarks/merge_throughput.py --methods ties --kernels auto

The family is generated on disk tensor by tensor (blockmerge.suite.synth.write_synthetic_llama, no nn.Module) in
--root, reused when --root/DONE exists (and never deleted here). Every measurement runs in its own
subprocess so that its peak RSS (VmHWM of the child's own address space) is its own. "cold" runs start
after dropping the page cache (`echo 1 > /proc/sys/vm/drop_caches`, needs root; reported as not cold
otherwise), "warm" runs follow immediately so the inputs are (mostly) in the page cache.
Each method runs with each --kernels value (BLOCKMERGE_KERNELS: auto = torch.compile'd CPU kernels for big
tensors, torch = the eager reference); "seconds" includes torch.compile's start-up in the merging process.
GB/s = bytes of all input files read / seconds; cpu_seconds = the child's user + system time (on a shared
machine the wall time also counts time spent waiting for a core). Writes benchmarks/out/merge_throughput.csv."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD_PEAK_RSS = r"""
import resource
def peak_rss():
    # VmHWM belongs to this exec's address space; ru_maxrss would also count the parent's pages at fork
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
"""

READ_CHILD = (
    CHILD_PEAK_RSS
    + r"""
import json, os, sys, time
files = json.loads(sys.argv[1])
buf = bytearray(64 << 20)
mv = memoryview(buf)
total = 0
t0 = time.perf_counter()
for f in files:
    fd = os.open(f, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while True:
            n = os.readv(fd, [mv])
            if n <= 0:
                break
            total += n
    finally:
        os.close(fd)
secs = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"bytes": total, "seconds": secs, "peak_rss": peak_rss(), "cpu_seconds": ru.ru_utime + ru.ru_stime}))
"""
)

MERGE_CHILD = (
    CHILD_PEAK_RSS
    + r"""
import json, sys, time
t_import = time.perf_counter()
from blockmerge.merge.run import run_merge
from blockmerge.io.checkpoint import Checkpoint
cfg, out = json.loads(sys.argv[1]), sys.argv[2]
t0 = time.perf_counter()
run_merge(cfg, out, force=True, progress=False)
secs = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": secs, "import_seconds": t0 - t_import, "peak_rss": peak_rss(),
                  "cpu_seconds": ru.ru_utime + ru.ru_stime}))
"""
)


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def child(code: str, *args: str, kernels: str | None = None) -> dict:
    env = dict(os.environ, BLOCKMERGE_KERNELS=kernels) if kernels else None
    os.sync()  # the previous merge's output is written back now, not during this run
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"child failed ({r.returncode}):\n{r.stderr[-4000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["wall_seconds"] = wall
    return res


def input_files(dirs: list[Path]) -> list[str]:
    from blockmerge.io.checkpoint import shard_files

    return [str(f) for d in dirs for f in shard_files(d)]


def merge_config(method: str, base: Path, experts: list[Path], density: float) -> dict:
    """A config for any registered method: weights 1/N, the given density where the method sparsifies, 0.5 for
    a required global (slerp's and nearswap's t); template methods merge the base too."""
    from blockmerge.merge.registry import REQUIRED, get_method

    m = get_method(method)
    models = [base, *experts] if m.base == "template" else list(experts)
    models = models[: m.models_max] if m.models_max else models
    per_model = {p.name for p in m.tensor_params}
    params = {"weight": 1.0 / len(models)} if "weight" in per_model else {}
    if "density" in per_model and method != "task_arithmetic":
        params["density"] = density
    cfg = {
        "merge_method": method,
        "models": [{"model": str(e), "parameters": dict(params)} for e in models],
        "parameters": {p.name: 0.5 for p in m.global_params if p.default is REQUIRED},
    }
    return cfg if m.base == "template" else {**cfg, "base_model": str(base)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="/tmp/synth1b", help="family folder (base, expert0..), reused if DONE exists")
    ap.add_argument(
        "--methods", default="linear,ties,dare_ties", help="comma-separated merge methods (any of `blockmerge merge`)"
    )
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--shape", default="1b", help="synthetic family: 1b (the benchmark) or tiny (a smoke run)")
    ap.add_argument("--caches", default="cold,warm", help="page-cache states to run each case in")
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "out"))
    ap.add_argument("--work", default=None, help="where merged outputs go (deleted after each run)")
    ap.add_argument(
        "--kernels", default="auto,torch", help="BLOCKMERGE_KERNELS values to run each method with (auto: compiled)"
    )
    args = ap.parse_args(argv)
    temps = [c.strip() for c in args.caches.split(",") if c.strip()]
    if not temps or not set(temps) <= {"cold", "warm"}:
        ap.error(f"--caches {args.caches!r}: give cold, warm or both")

    from blockmerge.io.checkpoint import Checkpoint
    from blockmerge.suite.synth import ensure_synthetic_llama

    t0 = time.perf_counter()
    existed = (Path(args.root) / "DONE").exists()
    base, experts = ensure_synthetic_llama(args.root, n_experts=args.experts, shape=args.shape)
    gen_s = time.perf_counter() - t0
    ck = Checkpoint(base)
    params = ck.nbytes // 2
    print(
        f"family {args.root}: {params / 1e6:.1f}M params per model, {ck.num_layers} layers, "
        f"{len(experts)} experts, {'reused' if existed else f'generated in {gen_s:.0f}s'}"
    )
    files = input_files([base, *experts])
    in_bytes = sum(os.path.getsize(f) for f in files)
    rows = []

    def record(kind, cache, res, nbytes, kernels="-"):
        row = {
            "kind": kind,
            "kernels": kernels,
            "cache": cache,
            "bytes_read": nbytes,
            "seconds": round(res["seconds"], 3),
            "wall_seconds": round(res["wall_seconds"], 3),
            "GB_per_s": round(nbytes / 1e9 / res["seconds"], 3),
            "cpu_seconds": round(res["cpu_seconds"], 2),
            "peak_rss_GiB": round(res["peak_rss"] / 2**30, 3),
        }
        rows.append(row)
        print(
            f"{kind:>16} {kernels:>5} {cache:>5}: {nbytes / 1e9:6.2f} GB read in {row['seconds']:7.2f}s = "
            f"{row['GB_per_s']:5.2f} GB/s, {row['cpu_seconds']:7.1f} CPU-s, peak RSS {row['peak_rss_GiB']:.2f} GiB",
            flush=True,
        )

    for cache in temps:
        c = "cold" if cache == "cold" and drop_caches() else ("warm" if cache == "warm" else "cold?")
        record("read (I/O floor)", c, child(READ_CHILD, json.dumps(files)), in_bytes)

    work = Path(args.work or tempfile.mkdtemp(prefix="bm_merge_", dir="/tmp"))
    try:
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            cfg = merge_config(method, base, experts, args.density)
            for kernels in [k.strip() for k in args.kernels.split(",") if k.strip()]:
                for cache in temps:
                    out = work / f"out_{method}"
                    c = "cold" if cache == "cold" and drop_caches() else ("warm" if cache == "warm" else "cold?")
                    res = child(MERGE_CHILD, json.dumps(cfg), str(out), kernels=kernels)
                    record(f"merge {method}", c, res, in_bytes, kernels)
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    out_dir = Path(args.out_dir)
    path = out_dir / "merge_throughput.csv"
    from blockmerge.io.report import write_csv

    write_csv(path, rows)
    print(f"wrote {path}")
    worst = max(r["peak_rss_GiB"] for r in rows if r["kind"].startswith("merge"))
    print(f"largest merge peak RSS {worst:.2f} GiB ({'<' if worst < 2 else '>='} 2 GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
