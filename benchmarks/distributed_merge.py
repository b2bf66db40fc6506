"""`blockmerge merge` in 1 process and in N processes of a torch.distributed job (torchrun, gloo), on a synthetic
Llama family: wall time, speed-up, each rank's peak RSS, and whether the outputs are byte-identical.

    nice -n 10 python benchmarks/distributed_merge.py                     # 1b shape, ties, 1 vs 2 processes
    python benchmarks/distributed_merge.py --shape tiny --smoke            # seconds: a check that it runs

The family is blockmerge.suite.synth.ensure_synthetic_llama (reused from --root when present). Each rank runs
`blockmerge merge` through a small wrapper that records its peak RSS (VmHWM) and CPU time at exit; N > 1 runs
are launched with `python -m torch.distributed.run --standalone --nproc-per-node N`. Writes
--out-dir/distributed_merge.csv and prints a table."""

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

WRAPPER = r"""
import atexit, json, os, runpy, sys
stats_dir = sys.argv[1]

def dump():
    rss = 0
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            rss = int(line.split()[1]) * 1024
    t = os.times()
    rank = os.environ.get("RANK", "0")
    with open(os.path.join(stats_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": int(rank), "peak_rss": rss, "cpu_seconds": t.user + t.system}, f)

atexit.register(dump)
sys.argv = ["blockmerge", *sys.argv[2:]]
runpy.run_module("blockmerge.cli", run_name="__main__")
"""


def run_merge(n: int, config: Path, out: Path, work: Path) -> dict:
    """One merge in n processes; wall seconds and per-rank stats."""
    stats = Path(tempfile.mkdtemp(dir=work, prefix=f"stats{n}-"))
    wrapper = work / "wrapper.py"
    wrapper.write_text(WRAPPER)
    merge = [str(wrapper), str(stats), "merge", str(config), str(out), "--no-progress", "--force"]
    if n == 1:
        cmd = [sys.executable, *merge]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *merge]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, os.cpu_count() // n))))
    os.sync()
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{n}-process merge failed ({r.returncode}):\n{r.stderr[-4000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(stats.glob("rank*.json"))]
    if len(ranks) != n:
        raise RuntimeError(f"{n}-process merge: {len(ranks)} ranks reported")
    return {"seconds": wall, "ranks": ranks}


def digest(folder: Path) -> dict[str, int]:
    """A cheap fingerprint of every file (bytes compared later only where it matters)."""
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir())}


def same_files(a: Path, b: Path) -> bool:
    if digest(a) != digest(b):
        return False
    for p in sorted(a.iterdir()):
        with open(p, "rb") as fa, open(b / p.name, "rb") as fb:
            while True:
                x, y = fa.read(1 << 24), fb.read(1 << 24)
                if x != y:
                    return False
                if not x:
                    break
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="/tmp/synth1b", help="family folder (base, expert0..), reused if present")
    ap.add_argument("--shape", default="1b", help="synthetic family: 1b or tiny")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--method", default="ties", help="merge method (mergekit YAML merge_method)")
    ap.add_argument("--processes", default="1,2", help="comma-separated process counts")
    ap.add_argument("--rounds", type=int, default=2, help="runs per process count (the fastest is reported)")
    ap.add_argument("--smoke", action="store_true", help="one round (a check that the script runs)")
    ap.add_argument("--work", default=None, help="where outputs go (deleted at the end)")
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    counts = [int(c) for c in args.processes.split(",") if c.strip()]
    if not counts or min(counts) < 1:
        ap.error(f"--processes {args.processes!r}: give positive process counts")
    rounds = 1 if args.smoke else max(1, args.rounds)

    import yaml
    from blockmerge.suite.synth import ensure_synthetic_llama

    base, experts = ensure_synthetic_llama(args.root, n_experts=args.experts, shape=args.shape)
    params = {"weight": 1.0 / len(experts), "density": 0.5}
    config = {
        "merge_method": args.method,
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": params} for e in experts],
    }
    work = Path(tempfile.mkdtemp(dir=args.work, prefix="distributed-merge-"))
    rows = []
    try:
        cfg = work / "merge.yml"
        cfg.write_text(yaml.safe_dump(config))
        outs = {}
        for n in counts:
            outs[n] = work / f"out{n}"
            best = min((run_merge(n, cfg, outs[n], work) for _ in range(rounds)), key=lambda r: r["seconds"])
            rows.append(
                {
                    "method": args.method,
                    "processes": n,
                    "seconds": round(best["seconds"], 2),
                    "peak_rss_GiB_per_rank": round(max(r["peak_rss"] for r in best["ranks"]) / 2**30, 3),
                    "cpu_seconds": round(sum(r["cpu_seconds"] for r in best["ranks"]), 1),
                }
            )
        one = next((r["seconds"] for r in rows if r["processes"] == 1), None)
        for r in rows:
            r["speedup"] = round(one / r["seconds"], 2) if one else ""
            r["identical_to_first"] = same_files(outs[counts[0]], outs[r["processes"]])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out_dir = Path(args.out_dir)
    from blockmerge.io.report import write_csv

    write_csv(out_dir / "distributed_merge.csv", rows)
    print(f"{'processes':>9} {'seconds':>8} {'speed-up':>8} {'peak RSS/rank':>13} {'CPU s':>7}  identical")
    for r in rows:
        print(
            f"{r['processes']:>9} {r['seconds']:>8} {r['speedup']:>8} {r['peak_rss_GiB_per_rank']:>10} GiB "
            f"{r['cpu_seconds']:>7}  {r['identical_to_first']}"
        )
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; wrote {out_dir / 'distributed_merge.csv'}")
    return 0 if all(r["identical_to_first"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
