"""GPU check in one command (a few minutes on one GPU):

  1. kernels   the Triton kernels (combine: plain, DARE, TIES; project) against the torch reference, on CUDA
               tensors of odd shapes, fp32/bf16/fp16, 1..9 experts. The reference runs on CPU copies.
  2. merge     `run_merge(..., device="cuda")` against the same merge on CPU, for linear, task_arithmetic,
               ties and dare_ties (largest difference per method; DARE draws the same mask on both).
  3. divmerge  one DivMerge step (loss and dL/dGamma, layer level, JS) on CUDA against the CPU step, and
               learn() end to end (teacher pass, 4 Adam steps) on CUDA against CPU: the learned coefficients.
  4. bandwidth the kernels' GB/s (bytes read + written per call over the median time) against a device copy.

    python benchmarks/gpu_check.py [--out benchmarks/results] [--smoke]

Without CUDA, `--smoke` runs the same code on CPU (compiled kernels against the reference, CPU against CPU)
on toy sizes, so the script itself is tested in CI; a full run without CUDA is refused."""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # relative, of ||out - ref|| / ||ref||


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def family(n: int, shape: torch.Size, dtype: torch.dtype, dev: str, g: torch.Generator):
    base = torch.randn(shape, generator=g)
    experts = [base + 0.05 * torch.randn(shape, generator=g) for _ in range(n)]
    return base.to(dtype).to(dev), [e.to(dtype).to(dev) for e in experts]


def check_kernels(dev: str, smoke: bool) -> list[dict]:
    from blockmerge.kernels import combine, combine_torch, magnitude_thresholds, project, project_torch

    g = torch.Generator().manual_seed(0)
    shapes = [(1,), (1000,), (257, 33)] + ([] if smoke else [(4097, 1031), (3 << 20) + 7])
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape in shapes:
            for T in (1, 3) if smoke else (1, 3, 9):
                base, experts = family(T, torch.Size(shape if isinstance(shape, tuple) else (shape,)), dtype, dev, g)
                cpu_b, cpu_e = base.cpu(), [e.cpu() for e in experts]
                w = [0.3 + 0.1 * t for t in range(T)]
                thr = magnitude_thresholds(cpu_b, cpu_e, [0.5] * T)
                options = {
                    "plain": {},
                    "dare": dict(drop_p=0.3, seed=7, offset=12345),
                    "ties": dict(thresholds=thr, sign_consensus=True, normalize=True),
                }
                for op, kw in options.items():
                    out = combine(base, experts, w, out_dtype=torch.float32, **kw)
                    ref = combine_torch(cpu_b, cpu_e, w, out_dtype=torch.float32, **kw)
                    err = rel_err(out, ref)
                    row = dict(check="kernel", case=f"combine-{op}", dtype=str(dtype)[6:], shape=str(shape), T=T)
                    if op == "dare":  # the same elements are dropped on both paths (exact, not a tolerance)
                        row["mask_equal"] = dare_masks_equal(base, T, kw)
                    rows.append(row | dict(rel_err=err, ok=err <= TOL[dtype] and row.get("mask_equal", True)))
                grad = torch.randn(base.shape, generator=g).to(dtype)
                out = project(grad.to(dev), base, experts)
                ref = project_torch(grad.double(), cpu_b.double(), [e.double() for e in cpu_e])
                err = rel_err(out, ref)
                rows.append(
                    dict(check="kernel", case="project", dtype=str(dtype)[6:], shape=str(shape), T=T, rel_err=err)
                    | dict(ok=err <= TOL[dtype])
                )
    return rows


def dare_masks_equal(like: torch.Tensor, T: int, kw: dict) -> bool:
    """Every task's DARE keep-mask, device kernel against the reference: with base 0, experts 1, weight 2^t
    and no rescaling, each output element is the exact integer sum of 2^t over the tasks that kept it
    (reading masks off real outputs would confuse a kept delta that rounds away with a dropped one)."""
    from blockmerge.kernels import combine, combine_torch

    zero, one, w = torch.zeros_like(like), torch.ones_like(like), [float(2**t) for t in range(T)]
    out = combine(zero, [one] * T, w, out_dtype=torch.float32, **kw | dict(rescale=False))
    ref = combine_torch(zero.cpu(), [one.cpu()] * T, w, out_dtype=torch.float32, **kw | dict(rescale=False))
    return bool(torch.equal(out.cpu(), ref))


def check_merge(dev: str, smoke: bool, tmp: Path) -> list[dict]:
    from blockmerge.io.checkpoint import Checkpoint
    from blockmerge.merge.run import run_merge
    from blockmerge.suite.synth import make_family

    size = dict(hidden_size=48) if smoke else dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4)
    base, experts = make_family(tmp / "fam", "llama", n_experts=3, dtype=torch.bfloat16, shard_size="2GB", **size)
    rows = []
    for method in ("linear", "task_arithmetic", "ties", "dare_ties"):
        params = {"weight": 0.5} | ({"density": 0.5} if method in ("ties", "dare_ties") else {})
        models = [{"model": str(e), "parameters": params} for e in experts]
        cfg = {"merge_method": method, "base_model": str(base), "models": models}
        if method == "linear":
            cfg = {"merge_method": method, "models": [{"model": str(base), "parameters": {"weight": 1.0}}, *models]}
        outs = {}
        for d in ("cpu", dev):
            outs[d] = run_merge(cfg, tmp / f"{method}-{d}", force=True, device=d, progress=False, dtype="float32")
        a, b = Checkpoint(outs["cpu"]), Checkpoint(outs[dev])
        worst, identical = 0.0, 0
        for name in a.tensors:
            x, y = a.get(name).double(), b.get(name).double()
            worst = max(worst, float((x - y).abs().max()))
            identical += bool(torch.equal(x, y))
        rows.append(dict(check="merge", case=method, dtype="bf16->fp32", T=3, max_abs_diff=worst)
                    | dict(identical_tensors=f"{identical}/{len(a.tensors)}", ok=worst <= 1e-6))  # fmt: skip
    return rows


def check_divmerge(dev: str, smoke: bool, tmp: Path) -> list[dict]:
    from blockmerge.learn.full import Batch, StreamedMerge
    from blockmerge.learn.losses import Targets
    from blockmerge.suite.synth import make_family

    size = dict(hidden_size=48) if smoke else dict(hidden_size=256, intermediate_size=768, vocab_size=2048)
    base, experts = make_family(tmp / "dm", "llama", n_experts=2, dtype=torch.float32, shard_size="2GB", **size)
    g = torch.Generator().manual_seed(1)
    B, S, N, T = 4, 24, 6, 2
    sm = {d: StreamedMerge(base, experts, device=d, attn_implementation="eager") for d in ("cpu", dev)}
    V = sm["cpu"].model.config.vocab_size
    ids = torch.randint(0, V, (B, S), generator=g)
    rows_, cols = torch.arange(B).repeat_interleave(N), torch.arange(S - N, S).repeat(B)
    tasks = torch.arange(B).remainder(T).repeat_interleave(N)
    probs = torch.softmax(3 * torch.randn(B * N, V, generator=g), -1)
    targets = Targets(probs=probs, ids=None, tail=None)
    weights = 1.0 / torch.bincount(tasks)[tasks].double()
    batch = Batch(ids, rows_, cols, weights, targets, tasks)
    gamma = 0.5 + 0.1 * torch.randn(T, len(sm["cpu"].blocks), generator=g)
    res = {d: m.loss_and_grad(gamma, batch, "js") for d, m in sm.items()}
    (l_cpu, g_cpu), (l_dev, g_dev) = res["cpu"], res[dev]
    loss_err = abs(l_dev - l_cpu) / max(abs(l_cpu), 1e-30)
    grad_err = rel_err(g_dev, g_cpu)
    row = dict(check="divmerge", case="js/layer step", dtype="fp32", T=T, rel_err=max(loss_err, grad_err))
    return [row | dict(loss_cpu=l_cpu, loss_dev=l_dev, grad_rel_err=grad_err, ok=loss_err < 1e-4 and grad_err < 1e-3)]


def check_learn(dev: str, smoke: bool, tmp: Path) -> list[dict]:
    """learn() end to end (teacher pass with KV cache, Adam over streamed steps) on CUDA against CPU."""
    from blockmerge.learn.full import learn
    from blockmerge.suite.synth import make_family

    base, experts = make_family(tmp / "learn", "llama", n_experts=2, dtype=torch.float32, tau_scale=0.05)
    g = torch.Generator().manual_seed(3)
    inputs = [[torch.randint(3, 97, (int(n),), generator=g).tolist() for n in torch.randint(2, 7, (6,), generator=g)]
              for _ in experts]  # fmt: skip
    kw = dict(level="layer", objective="js", steps=4, batch_size=4, max_new_tokens=4, progress=False)
    res = {d: learn(base, experts, inputs, device=d, cache_dir=tmp / f"teacher-{d}", **kw) for d in ("cpu", dev)}
    diff = float((res[dev].coefficients.cpu() - res["cpu"].coefficients).abs().max())
    loss_diff = max(abs(a - b) for a, b in zip(res[dev].losses, res["cpu"].losses, strict=True))
    row = dict(check="learn", case="js/layer 4 steps", dtype="fp32", T=2, max_abs_diff=diff, loss_diff=loss_diff)
    # Adam divides each gradient component by its own magnitude, so a component near 0 may step either way on
    # the two devices: coefficients agree to two learning-rate steps, the losses (same data) to fp32 rounding.
    return [row | dict(ok=diff <= 2 * 1e-2 + 1e-6 and loss_diff < 1e-4 * max(1.0, abs(res["cpu"].losses[0])))]


def median_seconds(fn, dev: str, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        if dev != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if dev != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def check_bandwidth(dev: str, smoke: bool) -> list[dict]:
    n = (1 << 16) if smoke else (1 << 26)
    g = torch.Generator().manual_seed(2)
    return [
        r for dtype in (torch.bfloat16, torch.float32) for r in bandwidth_rows(dev, n, dtype, g, 3 if smoke else 20)
    ]


def bandwidth_rows(dev: str, n: int, dtype: torch.dtype, g: torch.Generator, reps: int) -> list[dict]:
    """GB/s of each op with 4 experts: every op reads or writes 6 tensors of n elements."""
    from blockmerge.kernels import combine, magnitude_thresholds, project

    base, experts = family(4, torch.Size((n,)), dtype, dev, g)
    nbytes = 6 * n * base.element_size()
    copy_gbs = 2 * n * base.element_size() / median_seconds(base.clone, dev, reps) / 1e9
    thr = magnitude_thresholds(base, experts, [0.5] * 4)
    grad = torch.randn(n, generator=g).to(dtype).to(dev)
    ops = {
        "combine": lambda: combine(base, experts, [0.25] * 4),
        "combine-dare": lambda: combine(base, experts, [0.25] * 4, drop_p=0.5),
        "combine-ties": lambda: combine(base, experts, [1.0] * 4, thresholds=thr, sign_consensus=True, normalize=True),
        "project": lambda: project(grad, base, experts),
    }
    rows = [dict(check="bandwidth", case="copy", dtype=str(dtype)[6:], T=0, GBps=copy_gbs, ok=True)]
    for op, fn in ops.items():
        gbs = nbytes / median_seconds(fn, dev, reps) / 1e9
        rows.append(
            dict(check="bandwidth", case=op, dtype=str(dtype)[6:], T=4, GBps=gbs, pct_of_copy=100 * gbs / copy_gbs)
        )
        rows[-1]["ok"] = True
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS), help="folder for gpu_check.csv")
    ap.add_argument("--smoke", action="store_true", help="toy sizes; runs on CPU when there is no CUDA")
    args = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not args.smoke:
        print("gpu_check: error: no CUDA device (use --smoke to run the script on CPU)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="blockmerge-gpu-check-") as tmp:
        for step in (
            lambda: check_kernels(dev, args.smoke),
            lambda: check_merge(dev, args.smoke, Path(tmp)),
            lambda: check_divmerge(dev, args.smoke, Path(tmp)),
            lambda: check_learn(dev, args.smoke, Path(tmp)),
            lambda: check_bandwidth(dev, args.smoke),
        ):
            t0 = time.perf_counter()
            new = step()
            rows += new
            print(f"  {new[0]['check']}: {sum(r['ok'] for r in new)}/{len(new)} ok ({time.perf_counter() - t0:.1f}s)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"device": name} | r for r in rows]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "gpu_check.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    summarize(rows, name)
    return 0 if all(r["ok"] for r in rows) else 1


def summarize(rows: list[dict], name: str) -> None:
    print(f"\n| check | case | dtype | worst error / GB/s | ok |  ({name})\n|---|---|---|---:|---|")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["check"], r["case"], r["dtype"]), []).append(r)
    for (check, case, dtype), rs in groups.items():
        if check == "bandwidth":
            r = rs[0]
            val = f"{r['GBps']:.1f} GB/s" + (f" ({r['pct_of_copy']:.0f}% of copy)" if "pct_of_copy" in r else "")
        elif check in ("merge", "learn"):
            val = f"max |diff| {max(r['max_abs_diff'] for r in rs):.2e}"
            val += (
                f", {rs[0]['identical_tensors']} identical" if check == "merge" else f", loss {rs[0]['loss_diff']:.1e}"
            )
        else:
            val = f"rel err {max(r['rel_err'] for r in rs):.2e}"
        print(f"| {check} | {case} | {dtype} | {val} | {all(r['ok'] for r in rs)} |")


if __name__ == "__main__":
    sys.exit(main())
