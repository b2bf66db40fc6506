"""Parity with mergekit: the same YAML merged by mergekit (`mergekit-yaml`, from its own virtual environment) and
by blockmerge on a small synthetic Llama family (fp32, base + 3 experts = base + N(0, 0.002)); per method the
largest absolute and relative difference over all tensors, and the wall time and peak RSS of each tool.

    nice python benchmarks/mergekit_parity.py --mergekit-venv /tmp/mkvenv       # every method
    python benchmarks/mergekit_parity.py --smoke [--mergekit-venv DIR]          # tiny family, 2 methods

mergekit is never imported here: it runs as DIR/bin/mergekit-yaml under DIR/bin/python. Each merge runs in its
own subprocess, wrapped so that it reports its own VmHWM (peak RSS of that process) and wall time (imports
included). Without --mergekit-venv (or when DIR/bin/mergekit-yaml is missing) only blockmerge runs and the
table says so. Both compute in fp32 (`dtype: float32`), so a deterministic method agrees within fp32 rounding.
Randomised methods (dare_*, della*) draw different masks (mergekit uses torch's global RNG, blockmerge a
generator per tensor), so they are compared in distribution over the 2-D tensors: kept = fraction of entries
where merged != base (expected 1 - (1 - density)^n for n experts with independent drops) and slope = the
least-squares scale of (merged - base) onto the expected task vector sum_i w_i tau_i (1 for the linear
variants: dropping with rescale is unbiased). Writes --out/mergekit_parity.csv."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# Runs a console script (argv[1]) with the remaining arguments, then prints its wall time, VmHWM and bytes read
# from storage (page cache hits not counted) as JSON.
WRAPPER = r"""
import json, runpy, sys, time
script = sys.argv[1]
sys.argv = [script, *sys.argv[2:]]
t0 = time.perf_counter()
code = 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
secs = time.perf_counter() - t0
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
io = dict(l.split(": ") for l in open("/proc/self/io").read().splitlines())
res = {"seconds": secs, "peak_rss": hwm, "code": code, "read_bytes": int(io["read_bytes"])}
print("PARITY " + json.dumps(res), file=sys.stderr)
sys.exit(code)
"""

SMALL = dict(hidden=256, intermediate=688, layers=4, heads=4, kv_heads=2, vocab=2048)
TINY = dict(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=512)
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}
SMOKE_METHODS = "ties,dare_linear"
# Known differences, found with this benchmark and kept on purpose (see benchmarks/README.md)
NOTES = {
    "dare_ties": "rescale: blockmerge 1/density, mergekit ||tau||_1/||kept||_1 (the same in expectation)",
    "dare_linear": "rescale: blockmerge 1/density, mergekit ||tau||_1/||kept||_1 (the same in expectation)",
    "arcee_fusion": "entries near the threshold: blockmerge's row KL is float64, mergekit's fp32 loses ~5% of "
    "it to cancellation (bit-equal when blockmerge's KL is fp32); mergekit samples the quantiles of a tensor "
    "over 1M entries",
}
MK_FLAGS = ["--no-copy-tokenizer", "--allow-crimes"]


def family(root: Path, shape: dict) -> tuple[Path, list[Path]]:
    from blockmerge.suite.synth import write_synthetic_llama

    if (root / "DONE").exists():
        return root / "base", [root / f"expert{i}" for i in range(3)]
    dirs = write_synthetic_llama(root, n_experts=3, dtype=torch.float32, shard_size="1GB", force=True, **shape)
    (root / "DONE").write_text(json.dumps(shape))
    return dirs


def configs(base: Path, ex: list[Path], layers: int) -> dict[str, dict]:
    """One YAML (as a dict) per row of the table: each method with non-default parameters where it has any."""
    b, e0, e1, e2 = str(base), *map(str, ex)

    def models(ps: list[dict], paths=(e0, e1, e2)) -> list[dict]:
        return [{"model": p, "parameters": q} for p, q in zip(paths, ps, strict=True)]

    w3 = [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.7}]
    dens = [{"weight": 1.0, "density": 0.5}] * 3
    crumbs = [{"weight": 0.6, "density": 0.8, "gamma": 0.05}] * 3
    della = [{"weight": 0.6, "density": 0.5, "epsilon": 0.1}] * 3
    one = [{"model": e0}]
    half = layers // 2
    return {
        "linear": {"models": models(w3, (b, e0, e1))},
        "task_arithmetic": {"base_model": b, "models": models(w3)},
        "ties": {"base_model": b, "models": models(dens)},
        "dare_ties": {"base_model": b, "models": models(dens)},
        "dare_linear": {"base_model": b, "models": models([{"weight": 0.6, "density": 0.5}] * 3)},
        "breadcrumbs": {"base_model": b, "models": models(crumbs)},
        "breadcrumbs_ties": {"base_model": b, "models": models(crumbs)},
        "della": {"base_model": b, "models": models(della), "parameters": {"lambda": 1.0}},
        "della_linear": {"base_model": b, "models": models(della), "parameters": {"lambda": 1.0}},
        "sce": {"base_model": b, "models": models([{}] * 3), "parameters": {"select_topk": 0.5}},
        "ram": {"base_model": b, "models": models([{}] * 3), "parameters": {"epsilon": 0.002}},
        "ramplus_tl": {"base_model": b, "models": models([{}] * 3), "parameters": {"epsilon": 0.002}},
        "model_stock": {"base_model": b, "models": models([{}] * 3)},
        "nearswap": {"base_model": b, "models": one, "parameters": {"t": 0.002}},
        "arcee_fusion": {"base_model": b, "models": one},
        "slerp": {"base_model": b, "models": one, "parameters": {"t": 0.3}},
        "nuslerp": {"models": models([{"weight": 0.3}, {"weight": 0.7}], (e0, e1))},
        "nuslerp+base": {"base_model": b, "models": models([{"weight": 0.3}, {"weight": 0.7}], (e0, e1))},
        "multislerp": {"models": models(w3)},
        "multislerp+base": {"base_model": b, "models": models(w3)},
        "karcher": {"models": models([{}] * 3)},
        "passthrough": {"models": [{"model": e0, "parameters": {"scale": 0.5}}]},
        "passthrough slices": {
            "slices": [
                {"sources": [{"model": e0, "layer_range": [0, half + 1]}]},
                {"sources": [{"model": e1, "layer_range": [half - 1, layers]}]},
            ]
        },
    }


def method_of(row: str) -> str:
    return row.split("+")[0].split(" ")[0]


def run_tool(python: str, script: str, cfg: dict, out: Path, pre: list[str], post: list[str]) -> dict:
    """One merge in its own process: wall seconds, peak RSS, or the error's last line."""
    yml = out.with_suffix(".yaml")
    yml.write_text(json.dumps(cfg))  # JSON is YAML
    # cwd: the output's folder, so that no module beside the caller (benchmarks/kernels.py) shadows a package
    cmd = [python, "-c", WRAPPER, script, *pre, str(yml), str(out), *post]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("PARITY ")]
    res = json.loads(lines[-1][7:]) if lines else {"code": r.returncode}
    if res["code"] != 0 or not (out / "config.json").exists():
        err = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip() and not ln.startswith("PARITY ")]
        res["error"] = (err[-1] if err else f"exit {r.returncode}")[:200]
    return res


def load(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """Largest |a - b| and largest |a - b| / max|b| per tensor, over the tensors both hold."""
    common = sorted(set(a) & set(b))
    shape_diff = [n for n in common if a[n].shape != b[n].shape]
    abs_d = rel_d = 0.0
    for n in common:
        if n in shape_diff:
            continue
        d = (a[n].double() - b[n].double()).abs().max().item()
        abs_d = max(abs_d, d)
        rel_d = max(rel_d, d / max(b[n].double().abs().max().item(), 1e-30))
    notes = []
    if set(a) ^ set(b):
        notes.append(f"tensors only in one output: {sorted(set(a) ^ set(b))[:3]}")
    if shape_diff:
        notes.append(f"shapes differ: {shape_diff[:3]}")
    return {"max_abs_diff": abs_d, "max_rel_diff": rel_d, "notes": "; ".join(notes)}


def distribution(merged: dict, base: dict, experts: list[dict], cfg: dict) -> tuple[float, float]:
    """(kept fraction, slope of merged - base onto sum_i w_i tau_i) over the 2-D tensors."""
    ws = [m.get("parameters", {}).get("weight", 1.0) for m in cfg["models"]]
    lam = cfg.get("parameters", {}).get("lambda", 1.0)
    changed = total = 0
    dot = norm = 0.0
    for n, t in merged.items():
        if t.dim() != 2 or n not in base:
            continue
        d = t.double() - base[n].double()
        e = lam * sum(w * (x[n].double() - base[n].double()) for w, x in zip(ws, experts, strict=False))
        changed += int((d != 0).sum())
        total += d.numel()
        dot += float((d * e).sum())
        norm += float((e * e).sum())
    return changed / total, dot / norm


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mergekit-venv", default=None, help="virtual environment holding mergekit (bin/mergekit-yaml)")
    ap.add_argument("--methods", default=None, help="comma-separated rows (default: every method)")
    ap.add_argument("--smoke", action="store_true", help=f"tiny family, {SMOKE_METHODS}")
    ap.add_argument("--root", default=None, help="family folder (reused when it holds DONE)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder of mergekit_parity.csv")
    args = ap.parse_args(argv)
    shape = TINY if args.smoke else SMALL
    work = Path(tempfile.mkdtemp(prefix="bm_parity_", dir="/tmp"))
    root = Path(args.root) if args.root else work / "family"
    mk_script = Path(args.mergekit_venv or "/nonexistent") / "bin" / "mergekit-yaml"
    mk = mk_script.exists()
    if args.mergekit_venv and not mk:
        print(f"{mk_script}: not found; only blockmerge runs", file=sys.stderr)
    try:
        base, experts = family(root, shape)
        cfgs = configs(base, experts, shape["layers"])
        rows_wanted = (args.methods or (SMOKE_METHODS if args.smoke else ",".join(cfgs))).split(",")
        unknown = [r for r in rows_wanted if r not in cfgs]
        if unknown:
            ap.error(f"--methods: unknown {unknown} (expected some of {', '.join(cfgs)})")
        tensors = [load(d) for d in (base, *experts)]
        bm_script = shutil.which("blockmerge", path=str(Path(sys.executable).parent)) or "blockmerge"
        rows = []
        for name in rows_wanted:
            rows.append(one_row(name, cfgs[name], work, bm_script, mk_script if mk else None, tensors, args))
            print_row(rows[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    from blockmerge.io.report import write_csv

    write_csv(out / "mergekit_parity.csv", rows)
    print(f"wrote {out / 'mergekit_parity.csv'}")
    return 0


def one_row(name: str, cfg: dict, work: Path, bm_script: str, mk_script: Path | None, tensors, args) -> dict:
    cfg = {"merge_method": method_of(name), "dtype": "float32", **cfg}
    slug = name.replace(" ", "_").replace("+", "_")
    bm_out, mk_out = work / f"bm_{slug}", work / f"mk_{slug}"
    bm = run_tool(sys.executable, bm_script, cfg, bm_out, ["merge"], ["--no-progress"])
    row = {"method": name, "random": name in RANDOM}
    row.update({"bm_seconds": _r(bm.get("seconds")), "bm_peak_rss_MiB": _mib(bm.get("peak_rss"))})
    if mk_script is None:
        return {**row, "mergekit": "not given", "notes": bm.get("error", "")}
    mk = run_tool(str(mk_script.parent / "python"), str(mk_script), cfg, mk_out, [], MK_FLAGS)
    row.update({"mk_seconds": _r(mk.get("seconds")), "mk_peak_rss_MiB": _mib(mk.get("peak_rss"))})
    if "error" in bm or "error" in mk:
        return {**row, "notes": f"blockmerge: {bm.get('error', 'ok')} | mergekit: {mk.get('error', 'ok')}"}
    a, b = load(bm_out), load(mk_out)
    row.update(compare(a, b))
    row["notes"] = "; ".join(x for x in (NOTES.get(name, ""), row["notes"]) if x)
    if name in RANDOM:
        kb, sb = distribution(a, tensors[0], tensors[1:], cfg)
        km, sm = distribution(b, tensors[0], tensors[1:], cfg)
        dens = cfg["models"][0]["parameters"]["density"]
        exp = 1 - (1 - dens) ** len(cfg["models"])
        row["notes"] = (
            f"random: entries differ; kept bm {kb:.4f} mk {km:.4f} (expected {exp:.4f}); "
            f"slope onto sum w*tau bm {sb:.4f} mk {sm:.4f}" + (f"; {row['notes']}" if row["notes"] else "")
        )
    shutil.rmtree(bm_out, ignore_errors=True)
    shutil.rmtree(mk_out, ignore_errors=True)
    return row


def _r(x) -> float | None:
    return None if x is None else round(x, 2)


def _mib(x) -> float | None:
    return None if x is None else round(x / 2**20, 1)


def print_row(r: dict) -> None:
    diff = f"max|d| {r['max_abs_diff']:.3g} rel {r['max_rel_diff']:.3g}" if "max_abs_diff" in r else ""
    times = f"bm {r['bm_seconds']}s {r['bm_peak_rss_MiB']} MiB"
    if "mk_seconds" in r:
        times += f", mk {r['mk_seconds']}s {r['mk_peak_rss_MiB']} MiB"
    else:
        times += ", mergekit not given"
    print(f"{r['method']:<20} {diff:<32} {times}  {r.get('notes', '')}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
