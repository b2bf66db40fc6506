"""DivMerge: streamed loss and dL/dGamma == autograd through the fully materialised merged model; loss
formulas; learning reduces the loss; CLI end to end; bad configs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from blockmerge.cli import main
from blockmerge.io.checkpoint import Checkpoint, block_name
from blockmerge.learn.full import StreamedMerge, learn, write_merged
from blockmerge.learn.learner import make_batch
from blockmerge.learn.losses import Targets, chunked_head_loss, divergence, topk_targets
from blockmerge.learn.settings import DivMergeConfig, LearnSettings, load_config
from blockmerge.learn.teacher import ExpertTeachers, TeacherData, TeacherSpec, teacher_folders
from blockmerge.suite.synth import make_family
from torch.func import functional_call
from transformers import AutoModelForCausalLM

T = 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("dm")
    return {a: make_family(root / a, a, n_experts=T, tau_scale=0.05) for a in ("llama", "gpt2")}


def prompts(seed: int, n: int = 6) -> list[list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    return [
        [torch.randint(2, 97, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
        for _ in range(T)
    ]


def reference_loss_and_grad(base, experts, gamma, batch, objective, level):
    """Autograd through the whole merged model built in memory from a Gamma requiring grad."""
    full = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager").eval()
    bc, ecs = Checkpoint(base), [Checkpoint(e) for e in experts]
    names = [b.name for b in bc.blocks()]
    G = gamma.clone().requires_grad_()
    params = {}
    for n in bc.tensors:
        col = names.index(block_name(n))
        b0 = bc.get(n).float()
        params[n] = b0 + sum((G[t, col] if level == "layer" else G[t]) * (ecs[t].get(n).float() - b0) for t in range(T))
    if "lm_head.weight" not in params:  # tied
        params["lm_head.weight"] = params["transformer.wte.weight"]
    logits = functional_call(full, params, (batch.input_ids,)).logits
    logq = torch.log_softmax(logits[batch.rows, batch.cols], -1)
    loss = (divergence(logq, batch.targets, objective) * batch.weights.float()).sum()
    loss.backward()
    return float(loss.detach()), G.grad


@pytest.mark.parametrize(
    "arch,objective,level,full_vocab_max,kernels,memory",
    [
        ("llama", "js", "layer", 4096, "auto", 0),
        ("llama", "js", "layer", 4096, "compiled", 0),  # combine and project compiled (tiny tensors: forced)
        ("llama", "js", "task", 4096, "auto", 0),
        ("llama", "kl", "layer", 4096, "auto", 0),
        ("llama", "entropy", "layer", 4096, "auto", 0),
        ("llama", "js", "layer", 16, "auto", 0),  # top-k + tail bucket
        ("gpt2", "js", "layer", 4096, "auto", 0),  # tied lm_head: the head's use of wte counts to the embed block
        ("gpt2", "kl", "task", 16, "compiled", 0),
        # resident models, the whole graph kept (one backward pass instead of block-by-block recomputation)
        ("llama", "js", "layer", 4096, "auto", 1 << 30),
        ("llama", "entropy", "layer", 16, "auto", 1 << 30),
        ("gpt2", "js", "layer", 16, "auto", 1 << 30),
    ],
)
def test_streamed_gradient_equals_autograd(
    families, tmp_path, arch, objective, level, full_vocab_max, kernels, memory, monkeypatch
):
    monkeypatch.setenv("BLOCKMERGE_KERNELS", kernels)
    base, experts = families[arch]
    spec = TeacherSpec(
        max_new_tokens=5, eos_token_id=1, full_vocab_max=full_vocab_max, topk=8, store_dists=objective != "entropy"
    )
    data = TeacherData(teacher_folders(ExpertTeachers(experts), prompts(1), tmp_path, spec, progress=False))
    batch = make_batch([(0, 0), (1, 2), (2, 1), (0, 3), (1, 1)], data)
    sm = StreamedMerge(base, experts, token_chunk=7, attn_implementation="sdpa", resident_max_bytes=memory)
    assert sm.graph_fits(batch) == (memory > 0)
    nb = len(sm.blocks)
    g = torch.Generator().manual_seed(5)
    gamma = torch.rand((T, nb) if level == "layer" else (T,), generator=g) * 0.8
    full_gamma = gamma if level == "layer" else gamma[:, None].expand(T, nb)
    loss, grad = sm.loss_and_grad(full_gamma, batch, objective)
    if level == "task":
        grad = grad.sum(1)
    ref_loss, ref_grad = reference_loss_and_grad(base, experts, gamma, batch, objective, level)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5 * float(ref_grad.abs().max()))
    assert float(ref_grad.abs().max()) > 0


def _direct_js(p: list[float], q: list[float]) -> float:
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
    kl = lambda x, y: sum(a * math.log(a / b) for a, b in zip(x, y, strict=True) if a > 0)
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def test_losses_against_direct_formulas():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 11, generator=g, dtype=torch.float64)
    p = torch.softmax(torch.randn(4, 11, generator=g, dtype=torch.float64) * 2, -1)
    p[0, 3] = 0.0  # zero teacher probabilities: 0 log 0 = 0
    p[0] /= p[0].sum()
    logq = torch.log_softmax(logits, -1)
    q = logq.exp()
    js = divergence(logq, Targets(probs=p), "js")
    kl = divergence(logq, Targets(probs=p), "kl")
    ent = divergence(logq, None, "entropy")
    for i in range(4):
        pi, qi = p[i].tolist(), q[i].tolist()
        assert float(js[i]) == pytest.approx(_direct_js(pi, qi), rel=1e-10)
        assert float(kl[i]) == pytest.approx(
            sum(a * math.log(a / b) for a, b in zip(pi, qi, strict=True) if a > 0), rel=1e-10
        )
        assert float(ent[i]) == pytest.approx(-sum(b * math.log(b) for b in qi), rel=1e-10)
        assert 0 <= float(js[i]) <= math.log(2)
    assert float(divergence(logq, Targets(probs=q), "js").abs().max()) < 1e-12
    # top-k + tail: both distributions coarsened to the teacher's k ids + one bucket for the rest
    teacher_logits = torch.randn(4, 11, generator=g, dtype=torch.float64)
    t = topk_targets(teacher_logits, 3)
    pt = torch.softmax(teacher_logits.float(), -1)
    for i in range(4):
        ids = t.ids[i].tolist()
        p_c = [float(pt[i, j]) for j in ids] + [1 - sum(float(pt[i, j]) for j in ids)]
        q_c = [float(q[i, j]) for j in ids] + [1 - sum(float(q[i, j]) for j in ids)]
        assert float(t.tail[i]) == pytest.approx(p_c[-1], rel=1e-5)
        assert float(divergence(logq, t, "js")[i]) == pytest.approx(_direct_js(p_c, q_c), rel=1e-5)
    # chunked head loss (norm + head, in-place weight gradient) == plain autograd on all positions at once
    h = torch.randn(9, 5, generator=g, requires_grad=True)
    scale = torch.rand(5, generator=g).requires_grad_()  # a parameter of the "norm"
    W = torch.randn(11, 5, generator=g, requires_grad=True)
    bias = torch.randn(11, generator=g, requires_grad=True)
    tg = Targets(probs=torch.softmax(torch.randn(9, 11, generator=g), -1))
    w = torch.rand(9, generator=g)
    leaves = (h, scale, W, bias)
    norm = lambda x: torch.tanh(x) * scale
    ref = (divergence(torch.log_softmax(norm(h) @ W.T + bias, -1), tg, "js") * w).sum()
    ref_grads = torch.autograd.grad(ref, leaves)
    for chunk in (1, 4, 100):
        for x in leaves:
            x.grad = None
        loss = chunked_head_loss(h, w, tg, "js", norm, W, bias, chunk)
        assert loss == pytest.approx(float(ref.detach()), rel=1e-6)
        for x, gx in zip(leaves, ref_grads, strict=True):
            torch.testing.assert_close(x.grad, gx, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("objective,level", [("js", "layer"), ("entropy", "task")])
def test_learning_reduces_loss(families, tmp_path, objective, level):
    base, experts = families["llama"]
    inputs = prompts(2, n=8)
    res = learn(
        base,
        experts,
        inputs,
        level=level,
        objective=objective,
        steps=12,
        lr=5e-2,
        batch_size=24,
        max_new_tokens=4,
        eos_token_id=1,
        cache_dir=tmp_path,
        progress=False,
    )
    nb = len(res.block_names)
    assert res.coefficients.shape == (T, nb) and len(res.losses) == 12
    assert res.block_names[0] == "embed" and res.block_names[-1] == "head"
    if level == "task":
        assert torch.equal(res.coefficients, res.coefficients[:, :1].expand(T, nb))
    if objective == "entropy":
        assert float(res.coefficients.min()) >= 0 and float(res.coefficients.max()) <= 1
    # full batches: every step sees all sequences, so losses are comparable across steps
    assert res.losses[-1] < res.losses[0] * 0.98


def test_settings_object_and_overrides(families, tmp_path):
    """learn(base, experts, inputs, settings, **overrides): the overrides are validated into the settings
    model once, and learning with a settings object + overrides is learning with the same keywords."""
    base, experts = families["llama"]
    with pytest.raises(ValueError, match="settings: field steps: Input should be greater than or equal to 1"):
        learn(base, experts, prompts(4, n=2), steps=0)
    with pytest.raises(ValueError, match="settings: field bogus"):
        learn(base, experts, prompts(4, n=2), bogus=1)
    kw = dict(level="task", steps=2, batch_size=6, max_new_tokens=3, eos_token_id=1, cache_dir=tmp_path)
    a = learn(base, experts, prompts(4, n=4), LearnSettings(**kw, lr=0.5), lr=0.05, progress=False)
    b = learn(base, experts, prompts(4, n=4), **kw, lr=0.05, progress=False)
    assert a.config["lr"] == 0.05 and a.config["cache_dir"] == str(tmp_path)
    assert torch.equal(a.coefficients, b.coefficients) and a.losses == b.losses


def test_teacher_cache_is_reused_by_default(families, tmp_path, monkeypatch):
    """Without cache_dir, teacher passes go to $BLOCKMERGE_CACHE/teacher: a second run generates nothing
    and learns the same coefficients."""
    import blockmerge.learn.teacher as teacher

    monkeypatch.setenv("BLOCKMERGE_CACHE", str(tmp_path))
    calls = []
    real = teacher.continuations
    monkeypatch.setattr(teacher, "continuations", lambda *a, **k: calls.append(1) or real(*a, **k))
    base, experts = families["llama"]
    kw = dict(level="layer", steps=3, batch_size=6, max_new_tokens=3, eos_token_id=1, progress=False)
    first = learn(base, experts, prompts(4, n=4), **kw)
    assert len(calls) == T and len(list((tmp_path / "teacher").glob("*/manifest.json"))) == T
    second = learn(base, experts, prompts(4, n=4), **kw)
    assert len(calls) == T  # nothing regenerated
    assert torch.equal(first.coefficients, second.coefficients) and first.losses == second.losses


def test_write_merged_matches_formula(families, tmp_path):
    base, experts = families["gpt2"]
    C = torch.rand(T, 5, generator=torch.Generator().manual_seed(0))
    out = write_merged(base, experts, C, tmp_path / "m", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    sds = [AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (base, *experts)]
    names = [b.name for b in Checkpoint(base).blocks()]
    for n, w in merged.items():
        col = names.index("embed" if n == "lm_head.weight" else block_name(n))
        ref = sds[0][n] + sum(C[t, col] * (sds[t + 1][n] - sds[0][n]) for t in range(T))
        torch.testing.assert_close(w, ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="coefficients"):
        write_merged(base, experts, torch.zeros(T, 2), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def _write_config(tmp_path, base, experts, **extra):
    files = []
    for t, ps in enumerate(prompts(4, n=5)):
        f = tmp_path / f"task{t}.jsonl"
        f.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in ps))
        files.append(f.name)
    cfg = {
        "base_model": str(base),
        "models": [{"model": str(e), "data": f} for e, f in zip(experts, files, strict=True)],
        "steps": 3,
        "batch_size": 6,
        "max_new_tokens": 3,
        "eos_token_id": 1,
        **extra,
    }
    path = tmp_path / "dm.yml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_end_to_end(families, tmp_path, capsys):
    base, experts = families["llama"]
    cfg = _write_config(tmp_path, base, experts, level="layer", objective="js", cache_dir=str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["divmerge", str(cfg), str(out), "--steps", "2", "--no-progress"]) == 0
    info = json.loads((out / "divmerge.json").read_text())
    assert info["objective"] == "js" and len(info["losses"]) == 2 and len(info["coefficients"]) == T
    assert list(info["coefficients"][0]) == ["embed", "layers.0", "layers.1", "layers.2", "head"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[3, 4, 5]])).logits).all()
    # fully streamed (--memory 0: block-by-block recomputation) learns what the resident default learns
    assert main(["divmerge", str(cfg), str(tmp_path / "out0"), "--steps", "2", "--memory", "0", "--no-progress"]) == 0
    streamed = json.loads((tmp_path / "out0" / "divmerge.json").read_text())
    assert streamed["losses"] == pytest.approx(info["losses"], rel=1e-5)
    for a, b in zip(streamed["coefficients"], info["coefficients"], strict=True):
        assert list(a.values()) == pytest.approx(list(b.values()), rel=1e-5)
    # existing output: refused without --force, replaced with it
    assert main(["divmerge", str(cfg), str(out), "--steps", "1", "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["divmerge", str(cfg), str(out), "--steps", "1", "--force", "--no-progress"]) == 0
    assert len(json.loads((out / "divmerge.json").read_text())["losses"]) == 1


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c: c.pop("base_model"), "field base_model: Field required"),
        (lambda c: c.update(objective="mse"), "field objective"),
        (lambda c: c.update(level="neuron"), "field level"),
        (lambda c: c.update(lr=-1), "field lr"),
        (lambda c: c.update(bogus=1), "field bogus"),
        (lambda c: c["models"][1].pop("data"), "field models.1.data"),
        (lambda c: c["models"][0].update(data="missing.jsonl"), "models.0.data: data file"),
        (lambda c: c["models"][2].update(model="/nonexistent/x"), "models.2.model"),
        (lambda c: c.update(steps=2, epochs=1), "steps or epochs"),
        (lambda c: c.update(memory="8 parsecs"), "field memory: Value error, memory: '8 parsecs' is not a memory"),
    ],
)
def test_bad_config_errors(families, tmp_path, capsys, change, message):
    import yaml

    base, experts = families["llama"]
    path = _write_config(tmp_path, base, experts)
    cfg = yaml.safe_load(path.read_text())
    change(cfg)
    path.write_text(yaml.safe_dump(cfg))
    assert main(["divmerge", str(path), str(tmp_path / "out"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_memory_option(families, tmp_path, capsys):
    base, experts = families["llama"]
    path = _write_config(tmp_path, base, experts)
    assert main(["divmerge", str(path), str(tmp_path / "out"), "--no-progress", "--memory", "lots"]) == 2
    assert "error: --memory: 'lots' is not a memory size" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_data_and_yaml(families, tmp_path):
    base, experts = families["llama"]
    path = _write_config(tmp_path, base, experts)
    (tmp_path / "task1.jsonl").write_text('{"input_ids": [1, 2]}\n{"prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"models.1.data: .*task1.jsonl:2"):
        from blockmerge.learn.full import run_divmerge

        run_divmerge(path, tmp_path / "out", progress=False)
    path.write_text("base_model: [unclosed\n")
    with pytest.raises(ValueError, match="invalid YAML"):
        load_config(path, DivMergeConfig, "models")
