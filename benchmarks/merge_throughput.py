"""Throughput and memory of `blockmerge merge` on a synthetic ~1.1B-parameter Llama (bf16) with 3 experts,
next to the I/O floor measured in the same run: plain sequential reading of the same input files plus writing
as many bytes as the merged output has (a new file, no fsync: the merge does not fsync either).

    nice -n 10 python benchmarks/merge_throughput.py     # linear, task_arithmetic, ties, dare_ties; kernels auto
    python benchmarks/merge_throughput.py --methods ties --kernels auto,torch --rounds 2

The family is generated on disk tensor by tensor (blockmerge.suite.synth.write_synthetic_llama, no nn.Module) in
--root, reused when --root/DONE exists (and never deleted here). Every measurement runs in its own
subprocess so that its peak RSS (VmHWM of the child's own address space) is its own. "cold" runs start
after dropping the page cache (`echo 1 > /proc/sys/vm/drop_caches`, needs root; reported as not cold
otherwise), "warm" runs follow immediately so the inputs are (mostly) in the page cache.
Each method runs with each --kernels value (BLOCKMERGE_KERNELS: auto = torch.compile'd CPU kernels for big
tensors, torch = the eager reference); "seconds" includes torch.compile's start-up in the merging process.
GB/s = bytes of all input files read / seconds; cpu_seconds = the child's user + system time (on a shared
machine the wall time also counts time spent waiting for a core); x_floor = seconds / the floor's seconds of
the same round and page-cache state; load1 = the 1-minute load average when the run started. --rounds N
repeats floor and merges N times, alternating, so that a busy moment shows as one noisy round.
Writes benchmarks/out/merge_throughput.csv."""

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
files, out, out_bytes = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
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
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
try:
    left = out_bytes
    while left > 0:
        left -= os.write(fd, mv[: min(left, len(mv))])
finally:
    os.close(fd)
secs = time.perf_counter() - t0
os.unlink(out)
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
    load1 = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"child failed ({r.returncode}):\n{r.stderr[-4000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["wall_seconds"], res["load1"] = wall, load1
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
        "--methods",
        default="linear,task_arithmetic,ties,dare_ties",
        help="comma-separated merge methods (any of `blockmerge merge`)",
    )
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--shape", default="1b", help="synthetic family: 1b (the benchmark) or tiny (a smoke run)")
    ap.add_argument("--caches", default="cold,warm", help="page-cache states to run each case in")
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "out"))
    ap.add_argument("--work", default=None, help="where merged outputs go (deleted after each run)")
    ap.add_argument(
        "--kernels", default="auto", help="BLOCKMERGE_KERNELS values to run each method with (e.g. auto,torch)"
    )
    ap.add_argument("--rounds", type=int, default=1, help="repeat floor and merges, alternating")
    args = ap.parse_args(argv)
    temps = [c.strip() for c in args.caches.split(",") if c.strip()]
    if not temps or not set(temps) <= {"cold", "warm"}:
        ap.error(f"--caches {args.caches!r}: give cold, warm or both")

    from blockmerge.io.checkpoint import Checkpoint
    from blockmerge.io.report import write_csv
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
    out_bytes = sum(os.path.getsize(f) for f in input_files([base]))  # a merge writes one model like the base
    rows = []
    floor: dict[tuple[int, str], float] = {}

    def record(kind, rnd, cache, res, kernels="-"):
        base_s = floor.setdefault((rnd, cache), res["seconds"])
        row = {
            "round": rnd,
            "kind": kind,
            "kernels": kernels,
            "cache": cache,
            "bytes_read": in_bytes,
            "bytes_written": out_bytes,
            "seconds": round(res["seconds"], 3),
            "x_floor": round(res["seconds"] / base_s, 2),
            "wall_seconds": round(res["wall_seconds"], 3),
            "GB_per_s": round(in_bytes / 1e9 / res["seconds"], 3),
            "cpu_seconds": round(res["cpu_seconds"], 2),
            "peak_rss_GiB": round(res["peak_rss"] / 2**30, 3),
            "load1": round(res["load1"], 2),
        }
        rows.append(row)
        write_csv(Path(args.out_dir) / "merge_throughput.csv", rows)  # after every run: a stopped run keeps its rows
        print(
            f"{rnd} {kind:>16} {kernels:>5} {cache:>5}: {row['seconds']:7.2f}s = {row['x_floor']:5.2f}x floor, "
            f"{row['GB_per_s']:5.2f} GB/s read, {row['cpu_seconds']:7.1f} CPU-s, peak RSS "
            f"{row['peak_rss_GiB']:.2f} GiB, load {row['load1']:.1f}",
            flush=True,
        )

    def cache_state(cache):
        return "cold" if cache == "cold" and drop_caches() else ("warm" if cache == "warm" else "cold?")

    work = Path(args.work or tempfile.mkdtemp(prefix="bm_merge_", dir="/tmp"))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    kernel_values = [k.strip() for k in args.kernels.split(",") if k.strip()]
    try:
        for rnd in range(1, args.rounds + 1):
            for cache in temps:
                c = cache_state(cache)
                floor_args = (json.dumps(files), str(work / "floor.out"), str(out_bytes))
                record("I/O floor", rnd, c, child(READ_CHILD, *floor_args))
                for method in methods:
                    cfg = merge_config(method, base, experts, args.density)
                    for kernels in kernel_values:
                        out = work / f"out_{method}"
                        c = cache_state(cache)
                        res = child(MERGE_CHILD, json.dumps(cfg), str(out), kernels=kernels)
                        record(f"merge {method}", rnd, c, res, kernels)
                        shutil.rmtree(out, ignore_errors=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    path = Path(args.out_dir) / "merge_throughput.csv"
    print(f"wrote {path}")
    targets = {"linear": 1.2, "task_arithmetic": 1.2, "ties": 2.0, "dare_ties": 2.0}  # x the I/O floor
    print("merge / kernels / cache: x floor per round (target)")
    for key in dict.fromkeys((r["kind"], r["kernels"], r["cache"]) for r in rows if r["kind"] != "I/O floor"):
        ratios = [r["x_floor"] for r in rows if (r["kind"], r["kernels"], r["cache"]) == key]
        target = targets.get(key[0].removeprefix("merge "))
        verdict = "" if target is None else f" ({target}x: {'met' if min(ratios) <= target else 'not met'})"
        print(f"  {' / '.join(key)}: {', '.join(f'{x:.2f}' for x in ratios)}{verdict}")
    worst = max(r["peak_rss_GiB"] for r in rows if r["kind"].startswith("merge"))
    print(f"largest merge peak RSS {worst:.2f} GiB ({'<' if worst < 2 else '>='} 2 GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
