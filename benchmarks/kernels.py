"""Throughput of the fused task-vector kernels (blockmerge.kernels.combine / project) against the unfused
torch expressions, and against a plain memory copy (the memory-bandwidth floor), in one run.

GB/s = bytes of all inputs read / time (combine: base + T experts; project: grad + base + T experts;
copy: the source). peak_extra_MiB = memory one call holds at its peak beyond its inputs (output plus
temporaries; peak_x_tensor: the same in input-tensor sizes), measured once per case after the timing.
Output allocation is part of every timed call (fused and unfused alike).
The fused path is what the dispatch picks: Triton on CUDA, the torch.compile'd formulas on CPU; on CPU the
eager torch reference (chunked, the fallback without a C++ compiler) is timed beside it ("eager").
The unfused expressions are the literal one-liners, computed in the input dtype:
  combine: base + sum(a * (e - base) for a, e in zip(weights, experts))
  project: torch.stack([torch.sum(grad * (e - base), dtype=torch.float32) for e in experts])
dare / ties: combine with DARE (p = 0.5) / TIES (density 0.5 thresholds, sign election, disjoint mean),
fused against the eager reference (no one-line unfused form).

  python benchmarks/kernels.py                      # device auto (cuda if available), writes CSV + PNG
  python benchmarks/kernels.py --sizes 1M,16M --tasks 4 --dtypes bf16
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from blockmerge.kernels import (  # noqa: E402
    backend,
    combine,
    combine_torch,
    magnitude_thresholds,
    project,
    project_torch,
)
from blockmerge.kernels.cpu import run_chunks  # noqa: E402

OPS = ("combine", "project", "dare", "ties")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FIELDS = [
    "op",
    "impl",
    "size",
    "T",
    "dtype",
    "ms",
    "GB/s",
    "ms_median",
    "GB/s_median",
    "pct_of_copy",
    "rounds",
    "device",
    "backend",
    "threads",
    "peak_extra_MiB",
    "peak_x_tensor",
]


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(s[:-1]) * mult[s[-1]]) if s[-1] in mult else int(s)


def size_label(n: int) -> str:
    for unit, m in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n % m == 0:
            return f"{n // m}{unit}"
    return str(n)


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def time_interleaved(cases: dict, device: torch.device, rounds: int, budget_s: float) -> dict[str, list[float]]:
    """Times (s) of each case, one per timed round. The cases are timed in turn, round after round (copy,
    fused, unfused side by side), so that on a shared machine neighbours in a round see about the same
    background load. The first round is a warm-up unless it took longer than budget_s (big sizes); at most
    `rounds` timed rounds (at least 2), and no more once the timed rounds have used budget_s."""
    t_round = time.perf_counter()
    first = {k: timed(fn, device) for k, fn in cases.items()}
    t_round = time.perf_counter() - t_round
    samples: dict = {k: [] for k in cases}
    done, spent = 0, 0.0
    if t_round > budget_s:
        done, spent = 1, t_round
        for k, v in first.items():
            samples[k].append(v)
    while done < rounds and (done < 2 or spent < budget_s):
        t0 = time.perf_counter()
        for k, fn in cases.items():
            samples[k].append(timed(fn, device))
        spent += time.perf_counter() - t0
        done += 1
    return samples


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def peak_extra_bytes(fn, device: torch.device) -> int | None:
    """Memory one call takes at its peak beyond what was allocated before it: its output plus any
    temporaries. CUDA: the caching allocator's peak. CPU (Linux): the resident-set high-water mark, reset
    just before the call by writing 5 to /proc/self/clear_refs; buffers that a path keeps across calls
    (the eager reference's per-worker chunk buffers, allocated by the warm-up) are not counted. None where
    it cannot be measured."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        del out
        return torch.cuda.max_memory_allocated(device) - before
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_bytes("VmRSS:")
    except OSError:
        return None
    out = fn()
    del out
    return max(0, _status_bytes("VmHWM:") - before)


def pooled_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) chunk by chunk on the worker pool of the CPU kernels (same threading as combine)."""
    run_chunks(src.numel(), src.device, lambda i, s, e: dst[s:e].copy_(src[s:e]))


def unfused_combine(base, experts, weights):
    return base + sum(a * (e - base) for a, e in zip(weights, experts, strict=True))


def unfused_project(grad, base, experts):
    return torch.stack([torch.sum(grad * (e - base), dtype=torch.float32) for e in experts])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    ap.add_argument("--sizes", default="1M,16M,64M", help="elements per tensor, comma separated (K/M/G suffixes)")
    ap.add_argument("--tasks", default="2,4,8", help="expert counts T")
    ap.add_argument("--dtypes", default="bf16,fp32", help=f"input dtypes among {','.join(DTYPES)}")
    ap.add_argument("--ops", default=",".join(OPS), help="dare / ties: combine with those options")
    ap.add_argument("--no-unfused", action="store_true", help="skip the unfused torch expressions")
    ap.add_argument("--rounds", type=int, default=5, help="max timed rounds over all cases of a (dtype, size)")
    ap.add_argument("--budget", type=float, default=3.0, help="stop adding rounds past this many seconds (min 2)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"), help="folder for CSV and PNG")
    args = ap.parse_args(argv)

    if args.device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(args.device)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    tasks = [int(t) for t in args.tasks.split(",")]
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    if not ops or not set(ops) <= set(OPS):
        ap.error(f"--ops {args.ops!r}: give one or more of {','.join(OPS)}")
    if not set(dtypes) <= set(DTYPES):
        ap.error(f"--dtypes {args.dtypes!r}: give one or more of {','.join(DTYPES)}")
    threads = torch.get_num_threads() if dev.type == "cpu" else 0
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"device {dev} [{name}], torch {torch.__version__}, torch threads {torch.get_num_threads()}")

    rows: list[dict] = []

    def record(op, impl, n, T, dname, ts, nbytes, bk, pct, peak, tensor_bytes):
        sec, med = min(ts), statistics.median(ts)
        row = dict(op=op, impl=impl, size=n, T=T, dtype=dname, ms=round(sec * 1e3, 3), ms_median=round(med * 1e3, 3))
        row.update({"GB/s": round(nbytes / sec / 1e9, 3), "GB/s_median": round(nbytes / med / 1e9, 3)})
        row.update({"pct_of_copy": round(pct, 1), "rounds": len(ts), "device": dev.type, "backend": bk})
        row["threads"] = threads
        row["peak_extra_MiB"] = "" if peak is None else round(peak / 2**20, 2)
        row["peak_x_tensor"] = "" if peak is None else round(peak / tensor_bytes, 2)  # in input-tensor sizes
        rows.append(row)
        ms, gbs = row["ms"], row["GB/s"]
        mem = "" if peak is None else f", peak +{row['peak_extra_MiB']:.1f} MiB = {row['peak_x_tensor']:.2f} tensors"
        print(
            f"{op:8s} {impl:9s} {size_label(n):>5s} T={T:<2d} {dname:5s} {ms:10.3f} ms {gbs:8.2f} GB/s"
            f"  ({row['pct_of_copy']:6.1f}% of copy, median of {len(ts)} rounds{mem})"
        )

    def bench_case(dname: str, n: int) -> None:
        dt = DTYPES[dname]
        esize = torch.empty((), dtype=dt).element_size()
        base = torch.randn(n, generator=g).to(device=dev, dtype=dt)
        experts = [(base.float() + 0.01 * torch.randn(n, generator=g).to(dev)).to(dt) for _ in range(max(tasks))]
        grad = torch.randn(n, generator=g).to(device=dev, dtype=dt)
        bk = backend(base)
        dst = torch.empty_like(base)
        cases = {("copy", "copy", 1): lambda: dst.copy_(base)}
        nbytes = {("copy", "copy", 1): n * esize}
        if dev.type == "cpu":  # the same copy spread over the CPU path's chunk pool: the floor is the faster one
            cases[("copy", "copy_pool", 1)] = lambda: pooled_copy(dst, base)
            nbytes[("copy", "copy_pool", 1)] = n * esize
        for T in tasks:
            es = experts[:T]
            w = [1.0 / T + 0.01 * i for i in range(T)]
            if "combine" in ops:
                cases[("combine", "fused", T)] = lambda es=es, w=w: combine(base, es, w)
                if bk == "compiled":
                    cases[("combine", "eager", T)] = lambda es=es, w=w: combine_torch(base, es, w)
                if not args.no_unfused:
                    cases[("combine", "unfused", T)] = lambda es=es, w=w: unfused_combine(base, es, w)
                for impl in ("fused", "eager", "unfused"):
                    nbytes[("combine", impl, T)] = (T + 1) * n * esize
            if "project" in ops:
                cases[("project", "fused", T)] = lambda es=es: project(grad, base, es)
                if bk == "compiled":
                    cases[("project", "eager", T)] = lambda es=es: project_torch(grad, base, es)
                if not args.no_unfused:
                    cases[("project", "unfused", T)] = lambda es=es: unfused_project(grad, base, es)
                for impl in ("fused", "eager", "unfused"):
                    nbytes[("project", impl, T)] = (T + 2) * n * esize
            for op in ("dare", "ties"):  # the option-heavy combines: fused vs the eager reference only
                if op not in ops:
                    continue
                if op == "dare":
                    kw = {"drop_p": 0.5, "seed": 1}
                else:  # thresholds are computed once per tensor, outside the kernel (as in a merge)
                    thr = magnitude_thresholds(base, es, [0.5] * T)
                    kw = {"thresholds": thr, "sign_consensus": True, "normalize": True}
                cases[(op, "fused", T)] = lambda es=es, w=w, kw=kw: combine(base, es, w, **kw)
                if bk == "compiled":
                    cases[(op, "eager", T)] = lambda es=es, w=w, kw=kw: combine_torch(base, es, w, **kw)
                for impl in ("fused", "eager"):
                    nbytes[(op, impl, T)] = (T + 1) * n * esize
        for (_, impl, _), fn in cases.items():
            if impl == "fused":  # compile (torch.compile / Triton) before any timed or warm-up round
                fn()
        samples = time_interleaved(cases, dev, args.rounds, args.budget)
        floor = [min(ts) for ts in zip(*(v for (op, _, _), v in samples.items() if op == "copy"), strict=True)]
        fbytes = n * esize
        for (op, impl, T), ts in samples.items():
            nb = nbytes[(op, impl, T)]
            # per round: this case's GB/s over the round's copy floor GB/s (best of copy and copy_pool)
            pct = statistics.median(100 * (nb / t) / (fbytes / c) for t, c in zip(ts, floor, strict=True))
            peak = peak_extra_bytes(cases[(op, impl, T)], dev)
            record(op, impl, n, T, dname, ts, nb, bk if impl == "fused" else "torch", pct, peak, fbytes)

    g = torch.Generator(device="cpu").manual_seed(0)
    t_start = time.perf_counter()
    for dname in dtypes:
        for n in sizes:
            bench_case(dname, n)
    print(f"total {time.perf_counter() - t_start:.1f} s")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "kernels.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=FIELDS)
        wr.writeheader()
        wr.writerows(rows)
    print(f"wrote {out / 'kernels.csv'}")
    summarize(rows)
    try:
        plot(rows, out / "kernels.png", f"{name}, torch threads {torch.get_num_threads()}")
        print(f"wrote {out / 'kernels.png'}")
    except ImportError as e:  # matplotlib is optional for the numbers
        print(f"no plot: {e}")
    return 0


def _get(rows, **kv):
    for r in rows:
        if all(r[k] == v for k, v in kv.items()):
            return r
    return None


def summarize(rows) -> None:
    """Fused vs copy floor and vs unfused, per dtype and size, T=4 (or the T closest to 4)."""
    print("\nsummary, T=4: best GB/s of inputs read; % of the copy floor = median over rounds of the ratio to the")
    print("same round's copy (best of copy_ and the pooled copy); fused/unfused speed-up from best times")
    for op in OPS:
        ts = sorted({r["T"] for r in rows if r["op"] == op})
        if not ts:
            continue
        T = min(ts, key=lambda t: abs(t - 4))
        for dname in dict.fromkeys(r["dtype"] for r in rows):
            for n in dict.fromkeys(r["size"] for r in rows):
                fu = _get(rows, op=op, impl="fused", T=T, dtype=dname, size=n)
                un = _get(rows, op=op, impl="unfused", T=T, dtype=dname, size=n)
                ea = _get(rows, op=op, impl="eager", T=T, dtype=dname, size=n)
                cps = [r for r in rows if r["op"] == "copy" and r["dtype"] == dname and r["size"] == n]
                if fu is None:
                    continue
                line = f"  {op:8s} T={T} {dname:5s} {size_label(n):>5s}: fused {fu['GB/s']:7.2f}"
                if cps:
                    cp = max(cps, key=lambda r: r["GB/s"])
                    line += f" | copy {cp['GB/s']:7.2f} | fused at {fu['pct_of_copy']:5.1f}% of copy"
                if ea:
                    line += f" | eager {ea['GB/s']:7.2f} ({ea['pct_of_copy']:5.1f}%)"
                if un:
                    line += f" | unfused {un['GB/s']:7.2f} (fused x{fu['GB/s'] / un['GB/s']:.1f})"
                print(line)


def plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [o for o in OPS if any(r["op"] == o for r in rows)]
    dts = list(dict.fromkeys(r["dtype"] for r in rows))
    fig, axes = plt.subplots(len(ops), len(dts), figsize=(5.5 * len(dts), 4 * len(ops)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, op in enumerate(ops):
        for j, dname in enumerate(dts):
            ax = axes[i][j]
            for k, T in enumerate(sorted({r["T"] for r in rows if r["op"] == op})):
                for impl, ls in (("fused", "-"), ("eager", "-."), ("unfused", "--")):
                    pts = sorted(
                        (r["size"], r["GB/s"])
                        for r in rows
                        if (r["op"], r["impl"], r["dtype"], r["T"]) == (op, impl, dname, T)
                    )
                    if pts:
                        ax.plot(
                            *zip(*pts, strict=True),
                            ls,
                            marker="o",
                            color=colors[k % len(colors)],
                            label=f"{impl} T={T}",
                        )
            for impl, mk in (("copy", "s"), ("copy_pool", "^")):
                cp = sorted((r["size"], r["GB/s"]) for r in rows if (r["impl"], r["dtype"]) == (impl, dname))
                if cp:
                    ax.plot(*zip(*cp, strict=True), ":", marker=mk, color="black", label=f"{impl} (floor)")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("elements per tensor")
            ax.set_ylabel("GB/s of inputs read")
            ax.set_title(f"{op}, {dname}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
