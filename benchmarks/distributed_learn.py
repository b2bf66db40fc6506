"""One DivMerge learning step (layer level, JS) in 1 process and in N processes of a torch.distributed job
(torchrun, gloo; blockmerge.learn.pipeline): seconds per step, speed-up, each rank's peak RSS, and how far the
N-process gradient is from the 1-process one.

    nice -n 10 python benchmarks/distributed_learn.py                  # 'small' Llama shape, 1 vs 2 processes
    python benchmarks/distributed_learn.py --shape tiny --smoke         # seconds: a check that it runs

Shapes: 'small' (hidden 1024, 8 layers, vocab 32000: 0.17B parameters, 0.33 GB per model in bf16), '1b' (the
synthetic 1.1B family of the other benchmarks) and 'tiny'; the family (base + 2 experts) is written to --root
once and reused. Teacher data are synthetic (random prompts, a random top-64 teacher distribution at the last
--targets positions of each sequence), as in benchmarks/divmerge_step.py: the step is the learner's
loss_and_grad, with every rank's blocks resident (--memory per process). Each run is a subprocess (N > 1:
`python -m torch.distributed.run --standalone --nproc-per-node N`) with OMP_NUM_THREADS = CPUs / N; the first
step (which reads the blocks) is reported apart from the median of the others. Writes
--out-dir/distributed_learn.csv and prints a table."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMALL = dict(hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=4, vocab=32000)


def family(root: Path, shape: str, experts: int) -> tuple[Path, list[Path]]:
    from blockmerge.suite.synth import ensure_synthetic_llama, write_synthetic_llama

    if shape != "small":  # the families the other benchmarks share
        return ensure_synthetic_llama(root, n_experts=experts, shape=shape)
    done = root / "DONE"
    if not done.exists() or json.loads(done.read_text()) != {"shape": shape, "n_experts": experts}:
        write_synthetic_llama(root, n_experts=experts, force=True, **SMALL)
        done.write_text(json.dumps({"shape": shape, "n_experts": experts}))
    return root / "base", [root / f"expert{i}" for i in range(experts)]


def synthetic_batch(vocab: int, experts: int, batch: int, seq: int, targets: int):
    """The same batch in every process (seeded): random prompts, top-64 + tail teacher distributions."""
    import torch
    from blockmerge.learn.learner import Batch
    from blockmerge.learn.losses import Targets

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    rows = torch.arange(batch).repeat_interleave(targets)
    cols = torch.arange(seq - targets, seq).repeat(batch)
    tasks = torch.arange(batch).remainder(experts).repeat_interleave(targets)
    weights = 1.0 / torch.bincount(tasks)[tasks].double()
    k = min(64, vocab - 1)
    top = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(len(rows))])
    probs = -torch.rand(len(rows), k + 1, generator=g).log()
    probs = probs / probs.sum(1, keepdim=True)
    return Batch(ids, rows, cols, weights, Targets(probs[:, :k].contiguous(), top, probs[:, k].contiguous()), tasks)


def child(args) -> None:
    """One process of a run: `--steps` steps of loss_and_grad; writes its times, peak RSS and gradient."""
    import torch
    from blockmerge.io.report import peak_rss_bytes
    from blockmerge.io.stream import parse_memory
    from blockmerge.learn.full import StreamedMerge
    from blockmerge.learn.pipeline import PipelinedMerge
    from blockmerge.merge.distributed import Group, in_job

    base, experts = family(Path(args.root), args.shape, args.experts)
    group = Group() if in_job() else None
    budget = parse_memory(args.memory)
    merge = StreamedMerge(base, experts, resident_max_bytes=budget, attn_implementation="eager")
    step = merge if group is None else PipelinedMerge(merge, group, budget)
    batch = synthetic_batch(merge.model.config.vocab_size, len(experts), args.batch, args.seq, args.targets)
    gamma = torch.full((len(experts), len(merge.blocks)), 1.0 / len(experts))
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss, grad = step.loss_and_grad(gamma, batch)
        times.append(time.perf_counter() - t0)
    rank = 0 if group is None else group.rank
    stats = dict(rank=rank, times=times, loss=loss, grad=grad.tolist(), peak_rss=peak_rss_bytes())
    if group is not None:
        stats.update(stages=step.P, replicas=step.R, blocks=[b.name for b in step.layers])
        group.close()
    (Path(args.child) / f"rank{rank}.json").write_text(json.dumps(stats))


def run(n: int, argv: list[str], work: Path, steps: int) -> list[dict]:
    stats = Path(tempfile.mkdtemp(dir=work, prefix=f"stats{n}-"))
    me = [__file__, *argv, "--steps", str(steps), "--child", str(stats)]
    cmd = [sys.executable, *me]
    if n > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *me]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // n)))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{n}-process step failed ({r.returncode}):\n{r.stderr[-4000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(stats.glob("rank*.json"))]
    if len(ranks) != n:
        raise RuntimeError(f"{n}-process step: {len(ranks)} ranks reported")
    return ranks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=None, help="family folder (default /tmp/synth_<shape>_learn), reused")
    ap.add_argument("--shape", default="small", choices=["small", "1b", "tiny"])
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--processes", default="1,2", help="comma-separated process counts")
    ap.add_argument("--steps", type=int, default=4, help="steps per run (the first reads the blocks)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per batch")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--targets", type=int, default=32, help="target positions per sequence")
    ap.add_argument("--memory", default="16GiB", help="resident blocks per process")
    ap.add_argument("--smoke", action="store_true", help="2 steps (a check that the script runs)")
    ap.add_argument("--work", default=None, help="where per-rank figures go (deleted at the end)")
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    args.root = args.root or f"/tmp/synth_{args.shape}_learn"
    if args.smoke:
        args.steps = 2
    if args.child:
        child(args)
        return 0
    counts = [int(c) for c in args.processes.split(",") if c.strip()]
    if not counts or min(counts) < 1:
        ap.error(f"--processes {args.processes!r}: give positive process counts")
    family(Path(args.root), args.shape, args.experts)  # written once, before the timed runs
    import shutil

    import torch

    work = Path(tempfile.mkdtemp(dir=args.work, prefix="distributed-learn-"))
    rows, first = [], None
    try:
        for n in counts:
            ranks = run(n, argv, work, args.steps)
            grad = torch.tensor(ranks[0]["grad"])
            first = grad if first is None else first
            later = [max(r["times"][i] for r in ranks) for i in range(1, args.steps)] or [ranks[0]["times"][0]]
            rows.append(
                {
                    "shape": args.shape,
                    "processes": n,
                    "stages x replicas": f"{ranks[0].get('stages', 1)}x{ranks[0].get('replicas', 1)}",
                    "first_step_s": round(max(r["times"][0] for r in ranks), 3),
                    "seconds_per_step": round(statistics.median(later), 3),
                    "peak_rss_GiB_per_rank": " ".join(f"{r['peak_rss'] / 2**30:.3f}" for r in ranks),
                    "grad_rel_diff_vs_first": f"{float((grad - first).abs().max() / first.abs().max()):.2e}",
                    "loss": round(ranks[0]["loss"], 6),
                }
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    one = next((r["seconds_per_step"] for r in rows if r["processes"] == 1), None)
    for r in rows:
        r["speedup"] = round(one / r["seconds_per_step"], 2) if one else ""
    from blockmerge.io.report import write_csv

    out = write_csv(Path(args.out_dir) / "distributed_learn.csv", rows)
    print(f"{'processes':>9} {'PxR':>4} {'first s':>8} {'s/step':>8} {'speed-up':>8}  peak RSS/rank GiB  grad diff")
    for r in rows:
        print(
            f"{r['processes']:>9} {r['stages x replicas']:>4} {r['first_step_s']:>8} {r['seconds_per_step']:>8} "
            f"{r['speedup']:>8}  {r['peak_rss_GiB_per_rank']:>17}  {r['grad_rel_diff_vs_first']}"
        )
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; wrote {out}")
    return 0 if all(float(r["grad_rel_diff_vs_first"]) < 1e-4 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
