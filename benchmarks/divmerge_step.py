"""One DivMerge learning step (layer level, JS, 3 experts) on the synthetic ~1B Llama bf16 family:
peak RSS and time per step, against the bound "2 blocks per model + activations + 1 GiB" and against
what holding every model in memory would take.

The step runs in a subprocess so that its ru_maxrss is its own. Teacher data are SYNTHETIC targets (no
teacher pass: generating with a 1B model block by block on a shared 2-core CPU would dominate the run):
random prompts of `--seq` tokens, the last `--targets` positions of each carry a random top-k teacher
distribution (k=64 + tail bucket, as the real teacher cache stores for a 32000-token vocabulary). The step
itself is exactly the learner's: StreamedMerge.loss_and_grad (streamed forward, chunked head loss,
block-by-block recomputed backward, project()).

Weights are read as bf16 and combined into fp32 per block (compute in fp32: CPU bf16 matmuls are slow).

    python benchmarks/divmerge_step.py [--root /tmp/synth1b] [--steps 2] [--batch 4] [--seq 64] [--device cpu]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def child(args) -> None:
    import torch
    from blockmerge.io.report import peak_rss_bytes
    from blockmerge.learn.full import Batch, StreamedMerge
    from blockmerge.learn.losses import Targets

    torch.manual_seed(0)
    base = Path(args.root) / "base"
    experts = [Path(args.root) / f"expert{i}" for i in range(args.experts)]
    rss0 = peak_rss_bytes()
    sm = StreamedMerge(base, experts, device=args.device, token_chunk=args.token_chunk)
    V = sm.model.config.vocab_size
    B, S, N = args.batch, args.seq, args.targets
    ids = torch.randint(0, V, (B, S))
    rows = torch.arange(B).repeat_interleave(N)
    cols = torch.arange(S - N, S).repeat(B)
    tasks = torch.arange(B).remainder(args.experts).repeat_interleave(N)
    counts = torch.bincount(tasks)
    weights = 1.0 / counts[tasks].double()
    k = 64
    topk_ids = torch.stack([torch.randperm(V)[:k] for _ in range(B * N)]).long()
    probs = torch.distributions.Dirichlet(torch.full((k + 1,), 0.3)).sample((B * N,))
    targets = Targets(probs=probs[:, :k].contiguous(), ids=topk_ids, tail=probs[:, k].contiguous())
    batch = Batch(ids, rows, cols, weights, targets, tasks)
    gamma = torch.full((args.experts, len(sm.blocks)), 1.0 / args.experts)
    opt_gamma = gamma.clone().requires_grad_()
    opt = torch.optim.Adam([opt_gamma], lr=1e-2)
    times, losses = [], []
    rss_setup = peak_rss_bytes()
    read0 = storage_read_bytes()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss, grad = sm.loss_and_grad(opt_gamma.detach(), batch, "js")
        opt_gamma.grad = grad
        opt.step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        print(
            f"  step {len(times)}: loss {loss:.5f}, {times[-1]:.1f}s, peak RSS {peak_rss_bytes() / 2**30:.2f} GiB",
            file=sys.stderr,
            flush=True,
        )
    out = dict(
        times=times,
        losses=losses,
        peak_rss=peak_rss_bytes(),
        rss_after_import=rss0,
        rss_after_setup=rss_setup,
        grad_norm=float(grad.norm()),
        n_blocks=len(sm.blocks),
        read_bytes_per_step=(storage_read_bytes() - read0) / args.steps,
    )
    if args.device.startswith("cuda"):
        out["peak_gpu"] = torch.cuda.max_memory_allocated()
    print("RESULT " + json.dumps(out), flush=True)


def storage_read_bytes() -> int:
    """Bytes this process has read from storage (page faults on mmap included, page-cache hits not)."""
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(io["read_bytes"])


def child_teacher(args) -> None:
    """A real (short) teacher pass of expert0, streamed from disk (nothing resident): time and peak RSS."""
    import tempfile

    import torch
    from blockmerge.io.checkpoint import Checkpoint
    from blockmerge.io.report import peak_rss_bytes
    from blockmerge.learn.teacher import TeacherData, TeacherSpec, teacher_pass

    g = torch.Generator().manual_seed(0)
    vocab = Checkpoint(Path(args.root) / "expert0").config["vocab_size"]
    prompts = torch.randint(3, vocab, (args.batch, args.seq - args.teacher_pass), generator=g).tolist()
    spec = TeacherSpec(max_new_tokens=args.teacher_pass, eos_token_id=None, topk=64)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        folder = teacher_pass(Path(args.root) / "expert0", prompts, tmp, spec, device=args.device, resident_max_bytes=0)
        dt = time.perf_counter() - t0
        tokens, plen, targets = TeacherData([folder]).get(0, 0)
        assert len(targets) == args.teacher_pass and (targets.topk or vocab <= spec.full_vocab_max)
    print("RESULT " + json.dumps(dict(seconds=dt, peak_rss=peak_rss_bytes())), flush=True)


def _run_child(flag: str) -> dict:
    cmd = [sys.executable, __file__, flag, *sys.argv[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    sys.stderr.write(proc.stderr[-4000:])
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"child {flag} failed (rc {proc.returncode})\n{proc.stdout[-2000:]}")
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="/tmp/synth1b")
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--shape", default="1b", help="synthetic family: 1b (the benchmark), 7b or tiny (a smoke run)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--targets", type=int, default=48, help="target positions per sequence (the last ones)")
    p.add_argument("--token-chunk", type=int, default=None, help="positions per head chunk (default: auto, ~32 MiB)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/out/divmerge_step.csv")
    p.add_argument(
        "--teacher-pass",
        type=int,
        default=0,
        help="also time a real streamed teacher pass of expert0 (batch prompts, N new tokens)",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-teacher", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.child_teacher:
        return child_teacher(args)

    from blockmerge.io.checkpoint import Checkpoint
    from blockmerge.suite.synth import ensure_synthetic_llama

    base_dir, expert_dirs = ensure_synthetic_llama(args.root, n_experts=args.experts, shape=args.shape)
    models = [Checkpoint(base_dir)] + [Checkpoint(e) for e in expert_dirs[: args.experts]]
    base = models[0]
    blocks = base.blocks()
    block_bytes = {b.name: sum(base.tensors[n].nbytes for n in b.tensors) for b in blocks}
    largest = max(block_bytes.values())
    cfg = base.config
    H, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    acts = (L + 1) * args.batch * args.seq * H * 4  # fp32 block-boundary activations kept on the host
    bound = largest * len(models) * 2 + acts + 2**30
    ckpt_total = sum(m.nbytes for m in models)
    n_params = sum(t.nbytes // t.dtype.itemsize for t in base.tensors.values())
    all_in_memory = ckpt_total + 2 * n_params * 4  # every checkpoint + fp32 merged weights + their fp32 grads

    t0 = time.perf_counter()
    r = _run_child("--child")
    wall = time.perf_counter() - t0
    G = 2**30
    rows = {
        "device": args.device,
        "experts": args.experts,
        "batch": f"{args.batch}x{args.seq} tokens, {args.targets} target positions/seq (synthetic top-64 targets)",
        "params": n_params,
        "blocks": r["n_blocks"],
        "largest_block_GiB_per_model": largest / G,
        "time_per_step_s": sum(r["times"]) / len(r["times"]),
        "step_times_s": " ".join(f"{t:.1f}" for t in r["times"]),
        "losses": " ".join(f"{x:.7f}" for x in r["losses"]),
        "grad_norm_last_step": f"{r['grad_norm']:.4e}",
        "storage_read_GB_per_step": r["read_bytes_per_step"] / 1e9,
        "rss_after_import_GiB": r["rss_after_import"] / G,
        "peak_rss_GiB": r["peak_rss"] / G,
        "bound_GiB (2 blocks x models + acts + 1 GiB)": bound / G,
        "activations_GiB": acts / G,
        "within_bound": r["peak_rss"] <= bound,
        "all_in_memory_GiB (checkpoints + fp32 merged + fp32 grads)": all_in_memory / G,
        "checkpoints_GiB": ckpt_total / G,
        "peak_gpu_GiB": r.get("peak_gpu", 0) / G,
        "subprocess_wall_s": wall,
    }
    if args.teacher_pass:
        t = _run_child("--child-teacher")
        rows["teacher_pass"] = f"expert0, {args.batch} prompts x {args.seq - args.teacher_pass} tokens, "
        rows["teacher_pass"] += f"{args.teacher_pass} new tokens, top-64, streamed"
        rows["teacher_pass_s"] = t["seconds"]
        rows["teacher_pass_peak_rss_GiB"] = t["peak_rss"] / G
        rows["teacher_bound_GiB (2 blocks x 1 model + 1 GiB)"] = (largest * 2 + 2**30) / G
    for k, v in rows.items():
        print(f"{k:>62}: {v:.3f}" if isinstance(v, float) else f"{k:>62}: {v}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows))
        w.writeheader()
        w.writerow(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
