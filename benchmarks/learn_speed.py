"""Speed of DivMerge's learning path: teacher sequences per second and seconds per learning step (JS, task
and layer level, batch 4 x k), for a base checkpoint and k experts, with the learner's defaults ("resident":
batched teacher, blocks kept resident within the default memory budget) and with the fully streamed path
("streamed": `memory=0`, teacher one prompt per generation), measured alternately in one run.

Experts are the base plus small seeded noise (speed does not depend on what they learned). Prompts are
seeded random token ids of 6-20 tokens; generation never stops at EOS (eos id -1), so every sequence
has `--new-tokens` tokens. Each step figure is the mean of `--steps` steps after one warm-up step (the
warm-up reads the resident blocks).

    python benchmarks/learn_speed.py --base BASE_DIR [--experts 2] [--prompts 4] [--new-tokens 8] \
        [--steps 2] [--device cpu|cuda] [--modes resident,streamed] [--repeats 1]
    python benchmarks/learn_speed.py --smoke     # a tiny synthetic model (tests)

Writes benchmarks/results/learn_speed.csv (or --out-dir)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

MODES = {"resident": dict(memory=None, gen_batch=64), "streamed": dict(memory=0, gen_batch=1)}


def make_experts(base: Path, k: int, root: Path, scale: float = 1e-3) -> list[Path]:
    """root/expert{i} = base + scale * std(tensor) * seeded noise (written once, reused)."""
    import shutil

    from blockmerge.io.checkpoint import Checkpoint
    from safetensors.torch import save_file

    ckpt = Checkpoint(base)
    out = []
    for i in range(k):
        d = root / f"expert{i}"
        if not (d / "model.safetensors").exists():
            d.mkdir(parents=True, exist_ok=True)
            g = torch.Generator().manual_seed(1000 + i)
            tensors = {}
            for name in ckpt.tensors:
                w = ckpt.get(name)
                noise = torch.randn(w.shape, generator=g, dtype=torch.float32) * float(w.float().std()) * scale
                tensors[name] = (w.float() + noise).to(w.dtype).contiguous()
            for f in base.iterdir():
                if f.suffix == ".json" and "index" not in f.name:
                    shutil.copy(f, d / f.name)
            save_file(tensors, str(d / "model.safetensors.tmp"), metadata={"format": "pt"})
            (d / "model.safetensors.tmp").rename(d / "model.safetensors")
        out.append(d)
    return out


def prompts_for(k: int, n: int, vocab: int, seed: int = 0) -> list[list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    lengths = lambda: int(torch.randint(6, 21, (1,), generator=g))
    return [[torch.randint(3, vocab, (lengths(),), generator=g).tolist() for _ in range(n)] for _ in range(k)]


def teacher_speed(experts, prompts, spec, budget, device, work: Path) -> tuple[float, list[Path]]:
    from blockmerge.learn.teacher import teacher_pass

    cache = Path(tempfile.mkdtemp(prefix="teacher-", dir=work))  # empty: everything is generated
    t0 = time.perf_counter()
    folders = [
        teacher_pass(e, p, cache, spec, device=device, resident_max_bytes=budget)
        for e, p in zip(experts, prompts, strict=True)
    ]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return sum(len(p) for p in prompts) / (time.perf_counter() - t0), folders


def step_seconds(base, experts, folders, budget, device, level, steps, batch_size) -> float:
    from blockmerge.learn.full import StreamedMerge
    from blockmerge.learn.learner import optimize
    from blockmerge.learn.settings import LearnSettings
    from blockmerge.learn.teacher import TeacherData

    merge = StreamedMerge(base, experts, device=device, resident_max_bytes=budget)
    data = TeacherData(folders)
    kw = dict(level=level, objective="js", lr=1e-2, batch_size=batch_size, seed=0)
    optimize(merge, data, LearnSettings(steps=1, **kw), progress=False)  # warm-up: resident blocks are read here
    return optimize(merge, data, LearnSettings(steps=steps, **kw), progress=False).seconds_per_step


def measure(a) -> list[dict]:
    from blockmerge.io.checkpoint import Checkpoint
    from blockmerge.io.stream import memory_budget
    from blockmerge.learn.teacher import TeacherSpec

    base = Path(a.base)
    experts = make_experts(base, a.experts, Path(a.work))
    vocab = int(Checkpoint(base).config.get("vocab_size", 97))
    prompts = prompts_for(a.experts, a.prompts, vocab)
    rows = []
    for rep in range(a.repeats):
        for mode in a.modes.split(","):
            m = MODES[mode]
            budget = memory_budget(m["memory"], a.device)
            spec = TeacherSpec(max_new_tokens=a.new_tokens, eos_token_id=-1, gen_batch=m["gen_batch"])
            seq_s, folders = teacher_speed(experts, prompts, spec, budget, a.device, Path(a.work))
            row = dict(mode=mode, repeat=rep, device=a.device, experts=a.experts, prompts=a.prompts,
                       new_tokens=a.new_tokens, batch=4 * a.experts, memory_budget=budget,
                       teacher_seq_per_s=round(seq_s, 4))  # fmt: skip
            for level in ("task", "layer"):
                s = step_seconds(base, experts, folders, budget, a.device, level, a.steps, 4 * a.experts)
                row[f"{level}_step_s"] = round(s, 4)
            print(
                f"{mode:9s} rep {rep}: teacher {row['teacher_seq_per_s']:.3f} seq/s "
                f"({1 / seq_s:.2f} s/seq), step task {row['task_step_s']:.3f} s, layer {row['layer_step_s']:.3f} s",
                flush=True,
            )
            rows.append(row)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=None, help="base checkpoint folder (HF safetensors)")
    p.add_argument("--work", default=None, help="folder for the noisy experts (default: a temporary one)")
    p.add_argument("--experts", type=int, default=2)
    p.add_argument("--prompts", type=int, default=4, help="prompts per task")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="timed learning steps per level (after one warm-up)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", default="resident,streamed")
    p.add_argument("--repeats", type=int, default=1, help="alternations of the modes")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--smoke", action="store_true", help="tiny synthetic model")
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    tmp = tempfile.TemporaryDirectory(prefix="learn-speed-")
    if a.smoke:
        from blockmerge.suite.synth import make_family

        a.base = str(make_family(Path(tmp.name) / "family", "llama", n_experts=0)[0])
        a.prompts, a.new_tokens, a.steps = min(a.prompts, 3), min(a.new_tokens, 3), 1
    if a.base is None:
        p.error("--base is required (or --smoke)")
    a.work = a.work or str(Path(tmp.name) / "experts")
    rows = measure(a)
    out = Path(a.out_dir)
    from blockmerge.io.report import write_csv

    write_csv(out / "learn_speed.csv", rows)
    print(f"wrote {out / 'learn_speed.csv'}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
