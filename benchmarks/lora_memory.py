"""Memory of learning DivMerge coefficients over LoRA adapters on a synthetic ~1.1B Llama (bf16 base).

    nice -n 10 python benchmarks/lora_memory.py

The base is blockmerge.suite.synth's synthetic Llama in --root (reused when --root/DONE exists, else generated
there tensor by tensor). Four random LoRA adapters (r=16, alpha=32, on q,k,v,o,gate,up,down of every layer,
fp32 factors as PEFT saves them, B non-zero) are written as PEFT adapter folders. Then, each in its own
subprocess (peak RSS = the child's VmHWM):

  teacher   greedy continuations of base + adapter t for every task, distributions cached (top-k + tail)
  learn     --steps learning steps, layer level, JS, batch mixing the 4 tasks (teacher cache reused)

and the bound "base block + adapters + activations + 1 GiB" with every term computed from the files and the
batch shape:
  base block   largest block of the base in the compute dtype (fp32), plus the same block as read (bf16)
               and the next one being prefetched (bf16): 8 bytes per parameter of the largest block
  adapters     the adapters' factors (as held by the low-rank modules, compute dtype)
  activations  block inputs kept on the host (layers x tokens x hidden x 4 B) + one layer's recompute
               working set (attention scores and MLP intermediates with their gradients, x 4) + the head's
               chunk of logits (chunk x vocab x 4 B, x 6 for log-softmax, probabilities and gradients)
Writes benchmarks/out/lora_memory.csv (and prints the table)."""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CHILD = r"""
import json, sys, time, torch
from blockmerge.io.report import peak_rss_bytes as peak_rss
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
from blockmerge.lora.learn import StreamedLoraMerge, learn
from blockmerge.learn.teacher import TeacherSpec, teacher_folders
t0 = time.perf_counter()
if a["what"] == "teacher":
    sm = StreamedLoraMerge(a["base"], a["adapters"], token_chunk=a["token_chunk"], quantize=a["quantize"])
    spec = TeacherSpec(max_new_tokens=a["max_new_tokens"], eos_token_id=a["eos"], full_vocab_max=4096, topk=64)
    import pathlib
    teacher_folders(sm, a["prompts"], pathlib.Path(a["cache"]), spec, progress=False)
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss": peak_rss()}))
else:
    res = learn(a["base"], a["adapters"], a["prompts"], level="layer", objective="js", steps=a["steps"],
                batch_size=a["batch_size"], max_new_tokens=a["max_new_tokens"], eos_token_id=a["eos"],
                cache_dir=a["cache"], progress=False, token_chunk=a["token_chunk"], quantize=a["quantize"])
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss": peak_rss(),
                      "seconds_per_step": res.seconds_per_step, "losses": res.losses}))
"""


def write_adapters(base_dir: Path, root: Path, n: int, r: int, alpha: int, seed: int = 0) -> list[Path]:
    """n PEFT-layout LoRA adapters for the base (no nn.Module: tensors straight to safetensors)."""
    import torch
    from blockmerge.io.checkpoint import Checkpoint
    from safetensors.torch import save_file

    base = Checkpoint(base_dir)
    out = []
    for i in range(n):
        d = root / f"adapter{i}"
        out.append(d)
        if (d / "adapter_model.safetensors").exists():  # reused, but only if it is the adapter asked for
            have = json.loads((d / "adapter_config.json").read_text())
            if (have["r"], have["lora_alpha"], have["base_model_name_or_path"]) != (r, alpha, str(base_dir)):
                raise SystemExit(f"{d}: an adapter of another rank or base is there; pass another --adapters-root")
            continue
        d.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(seed * 100 + i)
        tensors = {}
        for name, info in base.tensors.items():
            if not any(name.endswith(f"{t}.weight") for t in TARGETS):
                continue
            out_f, in_f = info.shape
            mod = name.removesuffix(".weight")
            tensors[f"base_model.model.{mod}.lora_A.weight"] = torch.randn(r, in_f, generator=g) / in_f**0.5
            tensors[f"base_model.model.{mod}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.02
        save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
        cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": TARGETS, "use_rslora": False,
               "base_model_name_or_path": str(base_dir), "task_type": "CAUSAL_LM", "bias": "none",
               "fan_in_fan_out": False, "lora_dropout": 0.0, "inference_mode": True}  # fmt: skip
        (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def run_child(args: dict) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"child {args['what']} failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="/tmp/synth1b")
    ap.add_argument("--shape", default="1b", help="synthetic family: 1b (the benchmark) or tiny (a smoke run)")
    ap.add_argument("--adapters-root", default="/tmp/synth1b_lora")
    ap.add_argument("--n-adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompts-per-task", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--token-chunk", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantize", default=None, choices=(None, "nf4", "int8"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "lora_memory.csv"))
    a = ap.parse_args()

    import torch
    from blockmerge.io.checkpoint import Checkpoint
    from blockmerge.suite.synth import ensure_synthetic_llama

    base_dir, _ = ensure_synthetic_llama(a.root, n_experts=0, shape=a.shape)
    base = Checkpoint(base_dir)
    cfg = base.config
    adapters = write_adapters(base_dir, Path(a.adapters_root), a.n_adapters, a.rank, 2 * a.rank)
    T = len(adapters)
    g = torch.Generator().manual_seed(0)
    vocab, H, inter = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]
    L, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    prompts = [
        [torch.randint(3, vocab, (a.prompt_len,), generator=g).tolist() for _ in range(a.prompts_per_task)]
        for _ in range(T)
    ]
    cache = Path(a.adapters_root) / f"teacher-{a.prompt_len}-{a.max_new_tokens}-{a.prompts_per_task}-{a.quantize}"
    common = dict(base=str(base_dir), adapters=[str(x) for x in adapters], prompts=prompts, cache=str(cache),
                  max_new_tokens=a.max_new_tokens, eos=None, token_chunk=a.token_chunk, threads=a.threads,
                  quantize=a.quantize, steps=a.steps, batch_size=T * a.prompts_per_task)  # fmt: skip
    cached = len(list(cache.glob("*/manifest.json"))) >= T
    t0 = time.perf_counter()
    teacher = run_child(dict(common, what="teacher"))
    learn = run_child(dict(common, what="learn"))
    wall = time.perf_counter() - t0

    # the bound, term by term
    largest = max(sum(_numel(base.tensors[n].shape) for n in b.tensors) for b in base.blocks())
    base_block = largest * (4 + 2 + 2)
    adapter_bytes = sum((x / "adapter_model.safetensors").stat().st_size for x in adapters)
    B = T * a.prompts_per_task
    S = a.prompt_len + a.max_new_tokens - 1
    n_targets = B * a.max_new_tokens
    kept = L * B * S * H * 4
    layer_ws = 4 * (B * heads * S * S * 4 + B * S * inter * 4 * 3 + B * S * H * 4 * 4)
    head_ws = 6 * min(a.token_chunk, n_targets) * vocab * 4
    activations = kept + layer_ws + head_ws
    bound = base_block + adapter_bytes + activations + (1 << 30)
    dense = base.nbytes // 2 * 4 * (1 + T)  # fp32 base + T materialised full-rank deltas, for comparison
    gi = lambda x: x / 2**30
    rows = [
        ("base block (largest, fp32 + bf16 + prefetched bf16)", base_block),
        (f"adapters ({T} x r={a.rank} factors, fp32)", adapter_bytes),
        ("activations (kept inputs + layer recompute + head chunk)", activations),
        ("slack", 1 << 30),
        ("bound", bound),
        ("peak RSS teacher pass" + (" (cache reused: not a measurement)" if cached else ""), teacher["peak_rss"]),
        (f"peak RSS learning ({a.steps} steps)", learn["peak_rss"]),
        (f"dense alternative: fp32 base + {T} full-rank deltas", dense),
    ]
    print(f"base {base_dir}: {base.nbytes / 1e9:.2f} GB bf16, {L} layers, largest block {largest / 1e6:.1f}M params")
    print(f"{T} adapters r={a.rank}; batch {B} sequences x {S} tokens, {n_targets} target positions; "
          f"quantize={a.quantize}")  # fmt: skip
    for name, v in rows:
        print(f"  {name:<58} {gi(v):7.3f} GiB")
    print(f"teacher pass {teacher['seconds']:.1f}s; learning {learn['seconds']:.1f}s incl. setup, "
          f"{learn['seconds_per_step']:.1f}s per step, losses {learn['losses']}; total wall {wall:.0f}s")  # fmt: skip
    ok = learn["peak_rss"] < bound and (cached or teacher["peak_rss"] < bound)
    print(f"peak below bound: {ok}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["quantity", "bytes", "GiB"])
        for name, v in rows:
            w.writerow([name, int(v), f"{gi(v):.4f}"])
        w.writerow(["teacher seconds", "", f"{teacher['seconds']:.2f}"])
        w.writerow(["seconds per learning step", "", f"{learn['seconds_per_step']:.2f}"])
    print(f"wrote {out}")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


if __name__ == "__main__":
    main()
