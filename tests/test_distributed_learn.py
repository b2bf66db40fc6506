"""DivMerge learning across the processes of a torch.distributed job (blockmerge.learn.pipeline): 2 gloo
processes on CPU, started here as torchrun would. One step's loss and dL/dGamma must equal the one-process
step (pipeline of 2 stages, and 2 data-parallel replicas), the learned coefficients must equal the one-process
run's, and a process that dies must stop the other with an error, leaving nothing at OUT."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import yaml
from blockmerge.learn.full import StreamedMerge
from blockmerge.learn.full import run_divmerge as full_divmerge
from blockmerge.learn.learner import make_batch
from blockmerge.learn.teacher import TeacherData, TeacherSpec, teacher_folders
from blockmerge.lora.learn import StreamedLoraMerge
from blockmerge.lora.learn import run_divmerge as lora_divmerge
from blockmerge.suite.synth import make_family, tiny_model
from test_distributed import launch
from test_lora import save_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = {"full": StreamedMerge, "lora": StreamedLoraMerge}


def _adapters(root, n: int = 2) -> list:
    return [
        save_adapter(root / f"ad{i}", 4, 8, False, 50 + i, targets=["q_proj", "v_proj", "down_proj"]) for i in range(n)
    ]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("distlearn")
    untied = make_family(root / "untied", "llama", n_experts=2, seed=3, tau_scale=0.05)
    tied = make_family(root / "tied", "llama", n_experts=2, seed=4, tau_scale=0.05, tie_word_embeddings=True)
    tiny_model("llama", seed=0).save_pretrained(root / "lora" / "base", max_shard_size="40KB")
    lora = (root / "lora" / "base", _adapters(root / "lora"))
    return {"untied": ("full", *untied), "tied": ("full", *tied), "lora": ("lora", *lora)}


def _prompts(seed: int, n: int = 5) -> list[list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(3, 97, (int(L),), generator=g).tolist() for L in (3, 5, 4, 6, 2)[:n]] for _ in range(2)]


DRIVER = textwrap.dedent(
    """
    import json, sys, torch
    from blockmerge.learn.full import StreamedMerge
    from blockmerge.learn.learner import make_batch
    from blockmerge.learn.pipeline import PipelinedMerge
    from blockmerge.learn.teacher import TeacherData
    from blockmerge.lora.learn import StreamedLoraMerge
    from blockmerge.merge.distributed import Group

    torch.set_num_threads(1)
    kinds = {"full": StreamedMerge, "lora": StreamedLoraMerge}
    group = Group()
    results = []
    for case in json.loads(open(sys.argv[1]).read()):
        memory = case["memory"]
        merge = kinds[case["kind"]](case["base"], case["dirs"], attn_implementation="eager", resident_max_bytes=memory)
        batch = make_batch([tuple(x) for x in case["items"]], TeacherData(case["folders"]))
        step = PipelinedMerge(merge, group, memory, stages=case["stages"], micro=3)
        loss, grad = step.loss_and_grad(torch.tensor(case["gamma"]), batch)
        results.append({"loss": loss, "grad": grad.tolist(), "stages": step.P, "replicas": step.R})
    open(f"{sys.argv[2]}.{group.rank}", "w").write(json.dumps(results))
    group.close()
    """
)


def test_one_step_equals_the_one_process_step(models, tmp_path):
    """Loss and dL/dGamma of one batch: 2 pipeline stages (3 micro-batches) and 2 data-parallel replicas, for full
    task vectors with untied and tied embeddings (the head's use of the embedding reaches the embed column)
    and for LoRA adapters; against the one-process loss_and_grad (itself tested against autograd)."""
    spec = TeacherSpec(max_new_tokens=3, eos_token_id=1)
    items = [(0, 0), (1, 2), (0, 3), (1, 1), (0, 4), (1, 0), (1, 4)]
    cases, want = [], []
    for i, (name, (kind, base, dirs)) in enumerate(models.items()):
        merge = KINDS[kind](base, dirs, attn_implementation="eager")
        folders = teacher_folders(merge, _prompts(i), tmp_path / "cache", spec, progress=False)
        batch = make_batch(items, TeacherData(folders))
        gamma = torch.rand(2, len(merge.blocks), generator=torch.Generator().manual_seed(i)) * 0.8
        loss, grad = merge.loss_and_grad(gamma, batch)
        assert float(grad.abs().max()) > 0
        # 2 stages, 2 replicas; for untied full task vectors also streamed (memory 0: blocks recomputed in the
        # backward pass, where resident ones keep the graph)
        for stages, memory in [(2, 1 << 30), (1, 1 << 30), *([(2, 0)] if name == "untied" else [])]:
            case = dict(kind=kind, base=str(base), dirs=[str(d) for d in dirs], folders=[str(f) for f in folders])
            cases.append(dict(case, items=items, gamma=gamma.tolist(), stages=stages, memory=memory, name=name))
            want.append((loss, grad))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(cases))
    ranks = launch([str(_driver(tmp_path)), str(plan), str(tmp_path / "got")], timeout=240)
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr[-3000:] for r in ranks]
    got = [json.loads((tmp_path / f"got.{r}").read_text()) for r in (0, 1)]
    assert got[0] == got[1]  # every rank ends the step with the same loss and gradient
    for case, res, (loss, grad) in zip(cases, got[0], want, strict=True):
        where = f"{case['name']}, {case['stages']} stage(s), memory {case['memory']}"
        assert (res["stages"], res["replicas"]) == ((2, 1) if case["stages"] == 2 else (1, 2)), where
        assert res["loss"] == pytest.approx(loss, rel=1e-6), where
        tol = dict(rtol=1e-5, atol=1e-7 * float(grad.abs().max()))
        torch.testing.assert_close(torch.tensor(res["grad"]), grad, **tol, msg=lambda m, w=where: f"{w}: {m}")
        if case["name"] == "tied":  # the tied head's share of the embedding's gradient is in the embed column
            assert float(grad[:, 0].abs().max()) > 0


def _driver(tmp_path):
    path = tmp_path / "driver.py"
    path.write_text(DRIVER)
    return path


def _config(tmp_path, name: str, kind: str, base, dirs, i: int) -> tuple:
    entries, field = ("models", "model") if kind == "full" else ("adapters", "adapter")
    rows = []
    for t, prompts in enumerate(_prompts(10 + i, n=5)):
        f = tmp_path / f"{name}{t}.jsonl"
        f.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in prompts))
        rows.append({field: str(dirs[t]), "data": str(f)})
    cfg = dict(level="layer", steps=3, batch_size=7, lr=0.05, max_new_tokens=3, eos_token_id=1,
               attn_implementation="eager", cache_dir=str(tmp_path / "cache"))  # fmt: skip
    cfg.update({"base_model": str(base), entries: rows})
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("name", ["tied", "lora"])
def test_learned_coefficients_equal_the_one_process_run(models, name, tmp_path):
    """`blockmerge divmerge` / `lora divmerge` under 2 processes (rank 0 runs the teacher pass into the cache,
    rank 1 reads it): the coefficients and losses of 3 steps equal the one-process run's within 1e-5."""
    kind, base, dirs = models[name]
    cfg = _config(tmp_path, name, kind, base, dirs, 0)
    command = ["divmerge"] if kind == "full" else ["lora", "divmerge"]
    multi, single = tmp_path / "multi", tmp_path / "single"
    ranks = launch(["-m", "blockmerge.cli", *command, str(cfg), str(multi), "--no-progress"], timeout=240)
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr[-3000:] for r in ranks]
    (full_divmerge if kind == "full" else lora_divmerge)(cfg, single, progress=False)
    a, b = (json.loads((d / "divmerge.json").read_text()) for d in (multi, single))
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-5, abs=1e-7)
    for ca, cb in zip(a["coefficients"], b["coefficients"], strict=True):
        assert list(ca) == list(cb)
        assert max(abs(ca[k] - cb[k]) for k in ca) <= 1e-5, (ca, cb)
    assert max(abs(v - 0.5) for c in a["coefficients"] for v in c.values()) > 0.05  # it learned something
    assert sorted(p.name for p in multi.iterdir()) == sorted(p.name for p in single.iterdir())
    assert not list(tmp_path.glob(".multi.*"))


KILLER = textwrap.dedent(
    """
    import os, sys
    from blockmerge.cli import main
    from blockmerge.learn import pipeline

    backward = pipeline.PipelinedMerge._backward
    calls = 0

    def dying(self, *args):
        global calls
        calls += 1
        if self.group.rank == 1 and calls == 6:
            os._exit(9)  # killed in the second step (4 micro-batches a step): no message, no cleanup
        return backward(self, *args)

    pipeline.PipelinedMerge._backward = dying
    sys.exit(main(sys.argv[1:]))
    """
)


def test_a_killed_process_stops_the_job_and_nothing_is_committed(models, tmp_path):
    kind, base, dirs = models["untied"]
    cfg = _config(tmp_path, "untied", kind, base, dirs, 1)
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    out = tmp_path / "out"
    ranks = launch([str(killer), "divmerge", str(cfg), str(out), "--no-progress"], timeout=120)
    assert ranks[1].returncode == 9
    assert ranks[0].returncode == 1
    message = ranks[0].stderr.strip().splitlines()[-1]
    assert message.startswith("blockmerge divmerge: error: DistributedError: lost contact with another process"), ranks[
        0
    ].stderr[-2000:]
    assert "nothing committed" in message
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*"))  # rank 0 released its claim
