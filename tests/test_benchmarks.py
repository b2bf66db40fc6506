"""Every benchmark script runs end to end on toy sizes (`--shape tiny`, tiny tensors) and writes what it
promises: these catch a script that no longer runs, not its speed (speed is measured by running them)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from blockmerge.suite.synth import ensure_synthetic_llama

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{script} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def load_script(name: str):
    """A benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench") / "family"
    ensure_synthetic_llama(root, n_experts=2, shape="tiny")
    return root


def test_family_of_another_shape_is_refused(family):
    with pytest.raises(ValueError, match=r"holds a 'tiny' family with 3 experts, asked for '1b'"):
        ensure_synthetic_llama(family, n_experts=2, shape="1b")
    with pytest.raises(ValueError, match="with 3 experts, asked for 'tiny' with 4"):
        ensure_synthetic_llama(family, n_experts=4, shape="tiny")
    with pytest.raises(ValueError, match="shape 'huge'"):
        ensure_synthetic_llama(family, shape="huge")


def test_kernels_benchmark(tmp_path):
    """A row per op and implementation (tiny tensors take the eager path), positive throughputs, a PNG;
    a bad --ops is refused by name."""
    args = ["--device", "cpu", "--sizes", "3K", "--tasks", "2,3", "--dtypes", "fp32", "--rounds", "2"]
    run("kernels.py", *args, "--budget", "2", "--out", str(tmp_path))
    rows = read_csv(tmp_path / "kernels.csv")
    got = {(row["op"], row["impl"], int(row["T"])) for row in rows}
    want = {("copy", "copy", 1), ("copy", "copy_pool", 1)}
    want |= {(op, "fused", T) for op in ("combine", "project", "dare", "ties") for T in (2, 3)}
    want |= {(op, "unfused", T) for op in ("combine", "project") for T in (2, 3)}
    assert got == want
    assert all(float(row["GB/s"]) > 0 and int(row["size"]) == 3 * 1024 for row in rows)
    assert all(float(row["peak_extra_MiB"]) >= 0 and float(row["peak_x_tensor"]) >= 0 for row in rows)
    assert (tmp_path / "kernels.png").stat().st_size > 0
    bad = subprocess.run(
        [sys.executable, str(BENCH / "kernels.py"), "--ops", "combine,sort"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--ops 'combine,sort'" in bad.stderr


def test_merge_throughput_benchmark(family, tmp_path):
    args = ["--root", str(family), "--shape", "tiny", "--experts", "2", "--methods", "linear,dare_ties"]
    run("merge_throughput.py", *args, "--kernels", "torch", "--caches", "warm", "--out-dir", str(tmp_path))
    rows = read_csv(tmp_path / "merge_throughput.csv")
    assert [(r["kind"], r["kernels"], r["cache"]) for r in rows] == [
        ("I/O floor", "-", "warm"),
        ("merge linear", "torch", "warm"),
        ("merge dare_ties", "torch", "warm"),
    ]
    in_bytes = sum(f.stat().st_size for d in ("base", "expert0", "expert1") for f in (family / d).glob("*.safetensors"))
    out_bytes = sum(f.stat().st_size for f in (family / "base").glob("*.safetensors"))
    assert all(int(r["bytes_read"]) == in_bytes and int(r["bytes_written"]) == out_bytes for r in rows)
    assert float(rows[0]["x_floor"]) == 1.0 and all(float(r["x_floor"]) > 0 for r in rows)  # / the floor's time
    assert all(float(r["peak_rss_GiB"]) > 0 and float(r["GB_per_s"]) > 0 for r in rows)


def test_merge_profile_benchmark(family, tmp_path):
    args = ["--root", str(family), "--shape", "tiny", "--experts", "2", "--reps", "1", "--no-compiled"]
    run("merge_profile.py", *args, "--out-dir", str(tmp_path))
    rows = read_csv(tmp_path / "merge_profile.csv")
    steps = [r["step"] for r in rows]
    assert "NaN/Inf check: aminmax (blockmerge)" in steps and "write the output block (pwrite)" in steps
    assert not any("compiled" in s and "rounding" not in s for s in steps)  # --no-compiled: never started
    assert all(float(r["block_cpu_ms"]) >= 0 and float(r["model_s"]) >= 0 for r in rows)


def test_divmerge_step_benchmark(family, tmp_path):
    args = ["--root", str(family), "--shape", "tiny", "--experts", "2", "--steps", "2", "--batch", "2"]
    args += ["--seq", "16", "--targets", "4", "--teacher-pass", "2", "--out", str(tmp_path / "step.csv")]
    run("divmerge_step.py", *args)
    (row,) = read_csv(tmp_path / "step.csv")
    assert row["within_bound"] == "True" and row["blocks"] == "4"
    losses = [float(x) for x in row["losses"].split()]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    assert 0 < float(row["grad_norm_last_step"]) < math.inf
    assert float(row["teacher_pass_s"]) > 0


def test_lora_memory_benchmark(family, tmp_path):
    def args(rank: int, out: str) -> list[str]:
        a = ["--root", str(family), "--shape", "tiny", "--adapters-root", str(tmp_path / "lora"), "--n-adapters"]
        a += ["2", "--rank", str(rank), "--prompts-per-task", "1", "--prompt-len", "8", "--max-new-tokens", "2"]
        return a + ["--steps", "2", "--token-chunk", "16", "--threads", "1", "--out", str(tmp_path / out)]

    run("lora_memory.py", *args(2, "lora.csv"))
    rows = {r["quantity"]: r for r in read_csv(tmp_path / "lora.csv")}
    assert int(rows["peak RSS learning (2 steps)"]["bytes"]) < int(rows["bound"]["bytes"])
    assert int(rows["adapters (2 x r=2 factors, fp32)"]["bytes"]) > 0
    assert float(rows["seconds per learning step"]["GiB"]) > 0
    # an adapter folder of another rank is not silently reused
    cmd = [sys.executable, str(BENCH / "lora_memory.py"), *args(3, "x.csv")]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "adapter of another rank or base" in again.stderr


def test_quality_outputs(tmp_path):
    """benchmarks/quality.py's table: ANP averaged over subsets per (method, k), the best merge per k in
    bold, the base never bolded; CSV rows and the plot written. (The sweep itself, Comparison.run, is
    tested on the micro suite in test_suite.py.)"""
    quality = load_script("quality")
    rows = [
        dict(method=m, k=k, subset=i, anp=anp, acc={"a": anp}, norm={"a": anp})
        for m, k, i, anp in [
            ("base", 2, 0, 0.9), ("ties", 2, 0, 0.5), ("ties", 2, 1, 0.7), ("divmerge_js_layer", 2, 0, 0.8),
            ("divmerge_js_layer", 2, 1, 0.8), ("ties", 3, 0, 0.4), ("divmerge_js_layer", 3, 0, 0.3),
        ]
    ]  # fmt: skip
    methods = ["base", "ties", "divmerge_js_layer"]
    quality.write_outputs(rows, tmp_path, methods, [2, 3], "header")
    md = (tmp_path / "quality.md").read_text().splitlines()
    assert md[0] == "header" and md[2] == "| method | k=2 (n=2) | k=3 (n=1) | mean |"
    assert md[4:] == [
        "| base | 0.900 |  | 0.900 |",
        "| ties | 0.600 | **0.400** | 0.500 |",
        "| divmerge_js_layer | **0.800** | 0.300 | 0.550 |",
    ]
    assert len(read_csv(tmp_path / "quality.csv")) == len(rows)
    assert (tmp_path / "quality.png").stat().st_size > 0


def test_peak_memory_measure():
    """The benchmark's per-call peak: a 64 MiB tensor written by the call counts, nothing else does."""
    bench = load_script("kernels")
    cpu = torch.device("cpu")
    big = bench.peak_extra_bytes(lambda: torch.ones(16 << 20), cpu)
    none = bench.peak_extra_bytes(lambda: None, cpu)
    assert big is not None and none is not None  # Linux: /proc/self/clear_refs
    assert 60 << 20 <= big <= 72 << 20 and none < 4 << 20


def test_gpu_check_smoke(tmp_path):
    """The GPU check's code runs on CPU in --smoke mode: every check has rows and passes; a full run without
    CUDA is refused with one line."""
    r = run("gpu_check.py", "--smoke", "--out", str(tmp_path))
    rows = read_csv(tmp_path / "gpu_check.csv")
    assert {r["check"] for r in rows} == {"kernel", "merge", "divmerge", "learn", "bandwidth"}
    assert all(r["ok"] == "True" for r in rows)
    assert {r["case"] for r in rows if r["check"] == "merge"} == {"linear", "task_arithmetic", "ties", "dare_ties"}
    assert "| divmerge | js/layer step |" in r.stdout
    if not torch.cuda.is_available():
        bad = subprocess.run([sys.executable, str(BENCH / "gpu_check.py")], capture_output=True, text=True)
        assert (
            bad.returncode == 2
            and bad.stderr.strip() == "gpu_check: error: no CUDA device (use --smoke to run the script on CPU)"
        )


def test_learn_speed_smoke(tmp_path):
    run("learn_speed.py", "--smoke", "--threads", "1", "--out-dir", str(tmp_path))
    rows = read_csv(tmp_path / "learn_speed.csv")
    assert [r["mode"] for r in rows] == ["resident", "streamed"]
    assert int(rows[1]["memory_budget"]) == 0 < int(rows[0]["memory_budget"])
    for r in rows:
        assert float(r["teacher_seq_per_s"]) > 0 and float(r["task_step_s"]) > 0 and float(r["layer_step_s"]) > 0


def test_quality_llm_smoke(tmp_path):
    """benchmarks/quality_llm.py end to end on the tiny random Llama: a row per method on the k=2 subset
    (the LoRA DivMerge included), the table, plot, model statistics and the pair's diagnosis written; a
    rerun resumes from the cache without merging again; --report-only rewrites the same table from the CSV;
    --time-limit 0 stops before any expert and exits cleanly."""
    quality_llm = load_script("quality_llm")
    args = ["--smoke", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    run("quality_llm.py", *args)
    rows = read_csv(tmp_path / "out" / "quality_llm.csv")
    assert [r["method"] for r in rows] == ["base", *quality_llm.RUN_ORDER, quality_llm.LORA_METHOD]
    assert all(r["k"] == "2" and 0.0 <= float(r["anp"]) <= 1.0 for r in rows)
    learned = [r for r in rows if r["method"] in quality_llm.LEARNED or r["method"] == quality_llm.LORA_METHOD]
    assert all(int(r["steps"]) == 1 and math.isfinite(float(r["loss_first"])) for r in learned)
    for r in learned:  # the per-task coefficients: the mean over blocks of the learned record's values
        record = json.loads(quality_llm.learned_path(quality_llm.parse_args(args), r["method"],
                                                     r["subset"].split("+")).read_text())  # fmt: skip
        means = [sum(c.values()) / len(c) for c in record["coefficients"]]
        assert list(json.loads(r["coef_task"]).values()) == pytest.approx(means, abs=1e-4)
    md = (tmp_path / "out" / "quality_llm.md").read_text()
    assert "Learned coefficients (per task" in md
    assert "| divmerge_js_layer | " in md and "0.9918" in md
    assert (tmp_path / "out" / "quality_llm.png").stat().st_size > 0
    diagnosis = json.loads((tmp_path / "out" / "quality_llm_diagnosis.json").read_text())
    assert set(diagnosis["learned"]) == set(quality_llm.LEARNED) and len(diagnosis["search_top"]) == 5
    assert "Best task-level coefficients by grid search" in md
    again = run("quality_llm.py", *args)
    assert "ANP" not in again.stderr and read_csv(tmp_path / "out" / "quality_llm.csv") == rows
    (tmp_path / "out" / "quality_llm.md").unlink()
    run("quality_llm.py", "--report-only", "--out", str(tmp_path / "out"))
    assert (tmp_path / "out" / "quality_llm.md").read_text() == md
    stopped = run("quality_llm.py", "--smoke", "--cache", str(tmp_path / "c2"), "--out", str(tmp_path / "o2"),
                  "--time-limit", "0")  # fmt: skip
    assert "time limit: stopping before expert" in stopped.stderr and not (tmp_path / "o2").exists()


def test_gguf_import_benchmark(tmp_path):
    """A tiny GGUF imported, its greedy answer and logits compared with transformers' GGUF loading."""
    run("gguf_import.py", "--smoke", "--dtypes", "float32", "--out", str(tmp_path))
    (row,) = read_csv(tmp_path / "gguf_import.csv")
    assert row["file"] == "tiny.gguf" and row["dtype"] == "float32"
    assert float(row["import_s"]) > 0 and float(row["import_peak_rss_gib"]) > 0 and float(row["output_mb"]) > 0
    assert row["answers_equal"] == "yes" and row["answer"] == row["hf_answer"]
    assert float(row["max_abs_logit_diff"]) == 0.0  # fp32: the same dequantised weights


def test_quality_llm_table_marks_partial_cells():
    """A method that ran on fewer subsets than its column's n says so; one that did not run is empty."""
    cell = load_script("quality_llm").cell
    assert cell(0.9625, 2, 3) == "0.963 (n=2)"
    assert cell(0.9625, 3, 3) == "0.963"
    assert cell(None, None, 3) == ""


def test_distributed_merge_benchmark(family, tmp_path):
    r = run(
        "distributed_merge.py",
        "--root",
        str(family),
        "--shape",
        "tiny",
        "--experts",
        "2",
        "--smoke",
        "--out-dir",
        str(tmp_path),
        "--work",
        str(tmp_path),
    )
    rows = read_csv(tmp_path / "distributed_merge.csv")
    assert [int(x["processes"]) for x in rows] == [1, 2]
    assert all(x["identical_to_first"] == "True" for x in rows), r.stdout
    assert all(float(x["peak_rss_GiB_per_rank"]) > 0 and float(x["seconds"]) > 0 for x in rows)
    assert not list(tmp_path.glob("distributed-merge-*"))  # outputs removed


def test_distributed_learn_benchmark(family, tmp_path):
    """1 vs 2 processes (a 2-stage pipeline): a row each, the same gradient, peak RSS of every rank."""
    args = ["--root", str(family), "--shape", "tiny", "--experts", "2", "--smoke", "--batch", "2", "--seq", "16"]
    r = run("distributed_learn.py", *args, "--targets", "4", "--out-dir", str(tmp_path), "--work", str(tmp_path))
    rows = read_csv(tmp_path / "distributed_learn.csv")
    assert [(int(x["processes"]), x["stages x replicas"]) for x in rows] == [(1, "1x1"), (2, "2x1")], r.stdout
    assert float(rows[1]["grad_rel_diff_vs_first"]) < 1e-5
    assert [len(x["peak_rss_GiB_per_rank"].split()) for x in rows] == [1, 2]
    assert all(float(x["seconds_per_step"]) > 0 for x in rows)
    assert not list(tmp_path.glob("distributed-learn-*"))  # per-rank figures removed


def test_lora_extract_benchmark(tmp_path):
    """A row per rank; at full rank (64 on the tiny pair) the error is the bf16 rounding of the factors."""
    run("lora_extract.py", "--smoke", "--root", str(tmp_path / "pair"), "--out-dir", str(tmp_path))
    rows = {int(r["rank"]): r for r in read_csv(tmp_path / "lora_extract.csv")}
    assert set(rows) == {4, 64} and all(int(r["modules"]) == 2 * 7 for r in rows.values())
    assert all(float(r["seconds"]) > 0 and float(r["peak_rss_MiB"]) > 0 for r in rows.values())
    assert float(rows[64]["max_rel_error"]) < 1e-2 < 0.5 < float(rows[4]["mean_rel_error"])


def test_mergekit_parity_smoke(tmp_path):
    """Without mergekit only blockmerge runs, the table says so; the comparison helpers measure what they say
    on tensors whose differences and drops are known."""
    r = run("mergekit_parity.py", "--smoke", "--mergekit-venv", str(tmp_path / "absent"), "--out", str(tmp_path))
    rows = read_csv(tmp_path / "mergekit_parity.csv")
    assert [row["method"] for row in rows] == ["ties", "dare_linear"]
    for row in rows:
        assert row["mergekit"] == "not given" and row["notes"] == ""
        assert float(row["bm_seconds"]) > 0 and float(row["bm_peak_rss_MiB"]) > 0
    assert "only blockmerge runs" in r.stderr

    parity = load_script("mergekit_parity")
    a = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "n": torch.ones(3)}
    b = {"w": torch.tensor([[1.0, 2.5], [3.0, 4.0]]), "n": torch.ones(3)}
    cmp = parity.compare(a, b)
    assert cmp["max_abs_diff"] == 0.5 and cmp["max_rel_diff"] == 0.5 / 4.0 and cmp["notes"] == ""
    base = {"w": torch.zeros(4, 4)}
    experts = [{"w": torch.full((4, 4), 2.0)}]
    merged = {"w": torch.zeros(4, 4)}
    merged["w"][:2] = 4.0  # half the entries kept and rescaled by 1 / 0.5: weight 1 * tau on average
    kept, slope = parity.distribution(merged, base, experts, {"models": [{"parameters": {"weight": 1.0}}]})
    assert kept == 0.5 and math.isclose(slope, 1.0)


def test_scale_7b_smoke(tmp_path, monkeypatch):
    """The 7B-shape script end to end on the tiny shape (no mergekit here): a merge row and a learning row,
    the family deleted afterwards unless asked to keep it; its output sampler and diff measure what they say."""
    root = tmp_path / "fam"
    run("scale_7b.py", "--smoke", "--root", str(root), "--out", str(tmp_path), "--mergekit-venv", str(tmp_path / "x"))
    rows = read_csv(tmp_path / "scale_7b.csv")
    assert [r["stage"].split(" (")[0] for r in rows] == ["merge task_arithmetic", "DivMerge step"]
    assert all(float(r["seconds"]) > 0 and float(r["peak_rss_GiB"]) > 0 and r["notes"] != "error" for r in rows)
    assert rows[0]["notes"] == "" and not root.exists()

    monkeypatch.syspath_prepend(str(BENCH))  # as when run as a script: it imports mergekit_parity beside it
    scale = load_script("scale_7b")
    base, _ = ensure_synthetic_llama(tmp_path / "fam2", n_experts=1, shape="tiny")
    s = scale.sample(base, every=1)
    assert len(s) == 2 + 9 * 2 + 1  # embed, final norm, head and 9 tensors per layer of the 2-layer shape
    other = {n: t.clone() for n, t in s.items()}
    name = sorted(other)[0]
    other[name].view(-1)[0] += 1.0
    d, frac, _ = scale.max_diff(s, other)
    assert frac == 1 / sum(t.numel() for t in s.values()) and d > 0
    x = {"w": torch.tensor([1.0, 0.25, -3.0])}  # bf16 ulps there: 2^-7, 2^-9, 2^-6
    y = {"w": torch.tensor([1.0 + 2**-7, 0.25, -3.0 - 2**-5])}
    assert scale.max_diff(x, y) == (2**-5, 2 / 3, 2.0)
    # a rerun of one stage replaces that stage's rows and keeps the others'
    again = [{**rows[1], "seconds": "9.9"}]
    kept = scale.keep_other_stages(tmp_path / "scale_7b.csv", again)
    assert [r["stage"] for r in kept] == [rows[0]["stage"], rows[1]["stage"]] and kept[1]["seconds"] == "9.9"
