"""Time and peak memory of `blockmerge lora extract` on a synthetic Llama-shaped pair (base, expert = base +
N(0, tau_scale) on every tensor, bf16), one rank per run.

    nice -n 10 python benchmarks/lora_extract.py               # 'small' pair: hidden 1024, 4 layers, 62M params
    python benchmarks/lora_extract.py --smoke                  # tiny pair, seconds (tests/test_benchmarks.py)

The pair is written tensor by tensor (blockmerge.suite.synth.write_synthetic_llama) in --root and reused when
--root/DONE exists. Each extraction runs `blockmerge lora extract` in its own subprocess (peak RSS = the
child's VmHWM) and is compared with the size of one checkpoint and of its largest block: streaming holds the
base's and the expert's block, the next two being read, and the fp32 delta and SVD of one module. A random
task vector has a flat singular spectrum, so the relative errors here are the worst case for a rank; a real
fine-tune's delta concentrates in its first singular values. Writes --out-dir/lora_extract.csv."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "small": dict(hidden=1024, intermediate=2816, layers=4, heads=16, kv_heads=4, vocab=8192),
    "tiny": dict(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=512),
}

CHILD = r"""
import json, resource, sys, time
def peak_rss():  # VmHWM: this exec's own address space (ru_maxrss would count the parent's pages at fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
from blockmerge.cli import main
t0 = time.perf_counter()
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t0, "peak_rss": peak_rss()}))
"""


def ensure_pair(root: Path, shape: str) -> tuple[Path, Path]:
    from blockmerge.suite.synth import write_synthetic_llama

    done = root / "DONE"
    if not done.exists() or json.loads(done.read_text()) != {"shape": shape}:
        write_synthetic_llama(root, n_experts=1, force=True, **SHAPES[shape])
        done.write_text(json.dumps({"shape": shape}))
    return root / "base", root / "expert0"


def extract(base: Path, expert: Path, out: Path, rank: int, threads: int) -> dict:
    argv = ["lora", "extract", str(out), "--base", str(base), "--model", str(expert), "--rank", str(rank)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-c", CHILD, *argv, "--no-progress", "--force"], capture_output=True, text=True, env=env
    )
    if r.returncode != 0:
        raise RuntimeError(f"lora extract failed ({r.returncode}):\n{r.stderr[-4000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["wall_seconds"] = time.perf_counter() - t0
    res["report"] = json.loads((out / "blockmerge_lora.json").read_text())["extract"]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="/tmp/lora_extract_pair", help="pair folder (base, expert0), reused")
    ap.add_argument("--shape", default="small", choices=tuple(SHAPES), help="synthetic pair size")
    ap.add_argument("--ranks", default="16,128", help="comma-separated adapter ranks")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each extraction")
    ap.add_argument("--smoke", action="store_true", help="tiny pair, ranks 4 and 64 (64 = full rank): seconds")
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    if args.smoke:
        args.shape, args.ranks = "tiny", "4,64"
    from blockmerge.io.checkpoint import Checkpoint

    base, expert = ensure_pair(Path(args.root), args.shape)
    ckpt = Checkpoint(base)
    model_mib = ckpt.nbytes / 2**20
    block_mib = max(sum(ckpt.tensors[t].nbytes for t in b.tensors) for b in ckpt.blocks()) / 2**20
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rank in map(int, args.ranks.split(",")):
            res = extract(base, expert, Path(tmp) / f"r{rank}", rank, args.threads)
            errors = [m["relative_error"] for m in res["report"]["modules"]]
            rows.append(
                {
                    "shape": args.shape,
                    "rank": rank,
                    "modules": len(errors),
                    "checkpoint_MiB": round(model_mib, 1),
                    "largest_block_MiB": round(block_mib, 1),
                    "seconds": round(res["seconds"], 2),
                    "peak_rss_MiB": round(res["peak_rss"] / 2**20, 1),
                    "max_rel_error": round(max(errors), 6),
                    "mean_rel_error": round(sum(errors) / len(errors), 6),
                }
            )
            print(" | ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    out = Path(args.out_dir)
    from blockmerge.io.report import write_csv

    write_csv(out / "lora_extract.csv", rows)
    print(f"load average {os.getloadavg()[0]:.2f}; wrote {out / 'lora_extract.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
