"""A 7B-shape run on one machine: a synthetic family with Llama-2-7B's shapes (bf16, base + 2 experts, 40 GB:
more than this machine's 24 GiB, so the page cache cannot hold it), merged by blockmerge and by mergekit in
one run (wall time, peak RSS, bytes read from storage, and how far their outputs differ), then one DivMerge
learning step at that shape (time, peak RSS, bytes read).

    python benchmarks/scale_7b.py --mergekit-venv /tmp/mkvenv [--root /tmp/synth7b] [--keep-family]
    python benchmarks/scale_7b.py --stages merge --keep-family   # one stage again; the CSV keeps the other's row
    python benchmarks/scale_7b.py --smoke                      # tiny shape, end to end in seconds

Each merge runs in its own process (benchmarks/mergekit_parity.py's wrapper: wall time with imports, VmHWM,
/proc/self/io read_bytes); mergekit runs from its own virtual environment and is never imported here. The
disk holds the family and one output at a time: each output is sampled (every 7th tensor, kept in memory) and
deleted before the next tool runs. The family is deleted at the end unless --keep-family. The learning step is
benchmarks/divmerge_step.py (streamed forward, chunked head loss, recomputed backward; synthetic top-64 teacher
targets). Writes OUT/scale_7b.csv."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from mergekit_parity import MK_FLAGS, run_tool
from safetensors import safe_open

HERE = Path(__file__).parent


def sample(folder: Path, every: int = 7) -> dict[str, torch.Tensor]:
    """Every `every`-th tensor of a checkpoint (by sorted name), in memory."""
    out: dict[str, torch.Tensor] = {}
    names = []
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            names += [(n, f) for n in h.keys()]
    for n, f in sorted(names)[::every]:
        with safe_open(f, "pt") as h:
            out[n] = h.get_tensor(n)
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float, float]:
    """Largest |a - b|, the fraction of entries that differ, and the largest difference in units of the last
    place of bf16 at that entry (8 significant bits), over the sampled tensors."""
    d, differ, total, ulps = 0.0, 0, 0, 0.0
    for n in a:
        x, y = a[n].float(), b[n].float()
        diff = (x - y).abs()
        ulp = torch.exp2(torch.floor(torch.log2(torch.maximum(x.abs(), y.abs()).clamp_min(1e-30))) - 7)
        d = max(d, diff.max().item())
        ulps = max(ulps, (diff / ulp).max().item())
        differ += int((diff != 0).sum())
        total += diff.numel()
    return d, differ / max(total, 1), ulps


def merge_row(tool: str, res: dict, read_gb: float) -> dict:
    G = 2**30
    return {
        "stage": f"merge task_arithmetic ({tool})",
        "seconds": round(res.get("seconds", float("nan")), 1),
        "peak_rss_GiB": round(res.get("peak_rss", 0) / G, 2),
        "storage_read_GB": round(res.get("read_bytes", 0) / 1e9, 1),
        "inputs_GB": round(read_gb, 1),
        "notes": res.get("error", ""),
    }


def learn_row(args, work: Path) -> dict:
    out = work / "divmerge_step.csv"
    cmd = [sys.executable, str(HERE / "divmerge_step.py"), "--root", str(args.root), "--shape", args.shape]
    cmd += ["--experts", "2", "--steps", "1", "--batch", "4", "--seq", str(args.seq), "--out", str(out)]
    cmd += ["--targets", str(min(48, args.seq - 1))]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with out.open() as f:
        r = next(csv.DictReader(f))
    return {
        "stage": f"DivMerge step (layer level, 2 experts, batch 4 x {args.seq} tokens)",
        "seconds": round(float(r["time_per_step_s"]), 1),
        "peak_rss_GiB": round(float(r["peak_rss_GiB"]), 2),
        "storage_read_GB": round(float(r["storage_read_GB_per_step"]), 1),
        "inputs_GB": round(float(r["checkpoints_GiB"]) * 2**30 / 1e9, 1),
        "notes": f"bound {float(r['bound_GiB (2 blocks x models + acts + 1 GiB)']):.2f} GiB; all models in memory "
        f"{float(r['all_in_memory_GiB (checkpoints + fp32 merged + fp32 grads)']):.1f} GiB",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mergekit-venv", default=None, help="virtual environment holding mergekit (bin/mergekit-yaml)")
    ap.add_argument("--root", default="/tmp/synth7b", help="family folder (reused when it holds DONE)")
    ap.add_argument("--smoke", action="store_true", help="tiny shape")
    ap.add_argument("--keep-family", action="store_true", help="do not delete the family at the end")
    ap.add_argument("--seq", type=int, default=64, help="tokens per sequence of the learning step")
    ap.add_argument(
        "--stages", default="merge,learn", help="merge (both tools) and/or learn; the CSV keeps the other stages' rows"
    )
    ap.add_argument("--out", default=str(HERE / "results"), help="folder of scale_7b.csv")
    args = ap.parse_args(argv)
    args.shape = "tiny" if args.smoke else "7b"
    if args.smoke:
        args.seq = min(args.seq, 16)

    from blockmerge.io.checkpoint import Checkpoint
    from blockmerge.suite.synth import ensure_synthetic_llama

    base, experts = ensure_synthetic_llama(args.root, n_experts=2, shape=args.shape)
    read_gb = sum(Checkpoint(d).nbytes for d in (base, *experts)) / 1e9
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": {"weight": 0.5}} for e in experts],
        "dtype": "bfloat16",
    }
    mk_script = Path(args.mergekit_venv or "/nonexistent") / "bin" / "mergekit-yaml"
    bm_script = shutil.which("blockmerge", path=str(Path(sys.executable).parent)) or "blockmerge"
    work = Path(tempfile.mkdtemp(prefix="bm_scale_", dir=Path(args.root).parent))
    stages = set(args.stages.split(","))
    rows = []
    try:
        if "merge" in stages:
            rows += merge_rows(cfg, bm_script, mk_script, work, read_gb)
        if "learn" in stages:
            rows.append(learn_row(args, work))
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep_family:
            shutil.rmtree(args.root, ignore_errors=True)
    out = Path(args.out) / "scale_7b.csv"
    from blockmerge.io.report import write_csv

    write_csv(out, keep_other_stages(out, rows))
    print(json.dumps(rows, indent=1))
    print(f"wrote {out}")
    return 0


def keep_other_stages(path: Path, rows: list[dict]) -> list[dict]:
    """This run's rows, after the rows of an earlier run (same CSV) for stages this run did not measure."""
    if not path.exists():
        return rows
    with path.open(newline="") as f:
        old = [
            r for r in csv.DictReader(f) if r["stage"].split(" (")[0] not in {x["stage"].split(" (")[0] for x in rows}
        ]
    return old + rows


def merge_rows(cfg: dict, bm_script: str, mk_script: Path, work: Path, read_gb: float) -> list[dict]:
    """task_arithmetic by blockmerge, then by mergekit (when installed), one output on disk at a time."""
    rows = []
    bm = run_tool(sys.executable, bm_script, cfg, work / "bm", ["merge"], ["--no-progress"])
    rows.append(merge_row("blockmerge", bm, read_gb))
    print(rows[-1], flush=True)
    bm_sample = sample(work / "bm") if "error" not in bm else {}
    shutil.rmtree(work / "bm", ignore_errors=True)
    if mk_script.exists():
        mk = run_tool(str(mk_script.parent / "python"), str(mk_script), cfg, work / "mk", [], MK_FLAGS)
        rows.append(merge_row("mergekit", mk, read_gb))
        if bm_sample and "error" not in mk:
            d, frac, ulps = max_diff(bm_sample, sample(work / "mk"))
            rows[-1]["notes"] = f"vs blockmerge over {len(bm_sample)} sampled tensors: max |d| {d:.3g} "
            rows[-1]["notes"] += f"({ulps:.3g} bf16 ulp), {frac:.2e} of entries differ"
            rows[-1]["notes"] += f"; blockmerge {rows[-1]['seconds'] / max(rows[0]['seconds'], 1e-9):.2f}x faster"
        print(rows[-1], flush=True)
        shutil.rmtree(work / "mk", ignore_errors=True)
    else:
        print(f"{mk_script}: not found; mergekit not run", file=sys.stderr)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
