"""Every common decoder family, exactly or refused: the streamed model that divmerge and its teacher use
(logits, teacher probabilities, loss, dL/dGamma) equals transformers' own *ForCausalLM on the merged
weights, or the guard (blockmerge.learn.guard) refuses the architecture with one line naming it. Tiny
2-layer configs; sliding windows (4 tokens) shorter than the sequences (up to 11 tokens)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from blockmerge.cli import main
from blockmerge.io.checkpoint import Checkpoint, block_name
from blockmerge.learn.full import StreamedMerge, learn
from blockmerge.learn.guard import WINDOW, shrunk_config
from blockmerge.learn.learner import make_batch
from blockmerge.learn.losses import divergence
from blockmerge.learn.model import StreamedModel
from blockmerge.learn.teacher import ExpertTeachers, TeacherData, TeacherSpec, teacher_folders, teacher_pass
from torch.func import functional_call
from transformers import AutoConfig, AutoModelForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")

T = 2
EXACT = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "granite", "cohere"]
EXACT += ["starcoder2", "gpt_neox", "gpt2", "falcon", "mixtral", "qwen2_moe", "qwen3_moe"]
# why each refused family is refused: the guard's message must say it
REFUSED = {"bloom": "fails"}  # the streamed forward meets a tensor left on the meta device
# LoRA divmerge on MoE: adapters on the Linear modules (attention, shared experts and their gate); LoRA on the
# fused experts' or routers' parameters (PEFT's target_parameters) is refused
MOE = {"mixtral", "qwen2_moe", "qwen3_moe"}
# options that make the families' quirks visible on a tiny config (non-trivial scales)
QUIRKS = {
    "granite": dict(embedding_multiplier=2.0, logits_scaling=3.0, residual_multiplier=0.5, attention_multiplier=0.3),
    "cohere": dict(logit_scale=0.5),
    "gemma2": dict(final_logit_softcapping=5.0),
}


def family_config(model_type: str):
    cfg = AutoConfig.for_model(model_type, **QUIRKS.get(model_type, {}))
    if hasattr(cfg, "sliding_window"):
        cfg.sliding_window = WINDOW
    if hasattr(cfg, "use_sliding_window"):
        cfg.use_sliding_window = True
    cfg = shrunk_config(cfg)
    cfg.attn_implementation = "eager"
    return cfg


def write_family(root, model_type: str):
    """root/base and T experts = base + independent noise (tau 0.05), fp32 checkpoints."""
    cfg = family_config(model_type)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg).float().eval()
    base.save_pretrained(root / "base")
    experts = []
    for t in range(T):
        g = torch.Generator().manual_seed(t + 1)
        with torch.no_grad():
            saved = [p.clone() for p in base.parameters()]
            for p in base.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
            base.save_pretrained(root / f"expert{t}")
            for p, s in zip(base.parameters(), saved, strict=True):
                p.copy_(s)
        experts.append(root / f"expert{t}")
    return root / "base", experts, cfg.vocab_size


def prompts(vocab: int, n: int = 4) -> list[list[list[int]]]:
    g = torch.Generator().manual_seed(3)
    return [[torch.randint(2, vocab, (6,), generator=g).tolist() for _ in range(n)] for _ in range(T)]


def merged_reference(base, experts, gamma, batch):
    """JS loss and dL/dGamma by autograd through transformers' own model on the merged weights. Every parameter
    as transformers loads it (its renamings, MoE experts fused) is merged, theta0 + sum_t Gamma[t, block] tau_t:
    the loading is linear, so this is the merge of the checkpoints' tensors."""
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").float().eval()  # noqa: E731
    full = load(base)
    thetas = [dict(load(e).named_parameters()) for e in experts]
    names = [b.name for b in Checkpoint(base).blocks()]
    G = gamma.clone().requires_grad_()
    params = {}
    for n, p0 in full.named_parameters():  # a tied head is the embedding's parameter
        col, b0 = names.index(block_name(n)), p0.detach()
        params[n] = b0 + sum(G[t, col] * (thetas[t][n].detach() - b0) for t in range(T))
    logits = functional_call(full, params, (batch.input_ids,)).logits  # tied head: tie_weights=True
    logq = torch.log_softmax(logits[batch.rows, batch.cols], -1)
    loss = (divergence(logq, batch.targets, "js") * batch.weights.float()).sum()
    loss.backward()
    return float(loss.detach()), G.grad


@pytest.mark.parametrize("model_type", EXACT)
def test_family_streamed_equals_transformers(model_type, tmp_path):
    base, experts, vocab = write_family(tmp_path, model_type)
    ids = torch.tensor(prompts(vocab)[0] + prompts(vocab)[1])[:, :6].repeat(1, 2)[:, :11]  # 11 > window
    want = AutoModelForCausalLM.from_pretrained(experts[0], attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(StreamedModel(experts[0]).forward(ids), want(ids).logits, rtol=1e-5, atol=1e-5)
    # teachers: greedy continuations and their probabilities = teacher forcing through transformers
    spec = TeacherSpec(max_new_tokens=5, eos_token_id=None, full_vocab_max=4096)
    data = TeacherData(teacher_folders(ExpertTeachers(experts), prompts(vocab), tmp_path / "cache", spec, False))
    for t in range(T):
        model = AutoModelForCausalLM.from_pretrained(experts[t], attn_implementation="eager").eval()
        tokens, plen, targets = data.get(t, 1)
        with torch.no_grad():
            p = torch.softmax(model(tokens[None]).logits[0, plen - 1 : len(tokens) - 1], -1)
        torch.testing.assert_close(targets.probs.float(), p, rtol=1e-4, atol=1e-5)
        assert torch.equal(tokens[plen:], p.argmax(-1))
    # loss and dL/dGamma (layer-level coefficients) = autograd through transformers on the merged weights
    batch = make_batch([(0, 0), (1, 2), (0, 3), (1, 1)], data)
    sm = StreamedMerge(base, experts, token_chunk=3, attn_implementation="sdpa")
    gamma = torch.rand((T, len(sm.blocks)), generator=torch.Generator().manual_seed(5)) * 0.8
    loss, grad = sm.loss_and_grad(gamma, batch, "js")
    ref_loss, ref_grad = merged_reference(base, experts, gamma, batch)
    assert float(ref_grad.abs().max()) > 0
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5 * float(ref_grad.abs().max()))
    # the same with every block resident and the step's whole graph kept
    resident = StreamedMerge(base, experts, token_chunk=3, attn_implementation="sdpa", resident_max_bytes=1 << 30)
    assert resident.graph_fits(batch)
    loss, grad = resident.loss_and_grad(gamma, batch, "js")
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5 * float(ref_grad.abs().max()))
    # and divmerge's learner runs end to end
    res = learn(base, experts, prompts(vocab), steps=2, batch_size=8, max_new_tokens=3, eos_token_id=None,
                cache_dir=tmp_path / "cache2", progress=False)  # fmt: skip
    assert res.coefficients.shape == (T, len(sm.blocks)) and len(res.losses) == 2


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_family_refused_by_the_guard(model_type, tmp_path, capsys):
    base, experts, vocab = write_family(tmp_path, model_type)
    with pytest.raises(ValueError, match=rf"^{model_type}: .*{REFUSED[model_type]}.*not supported for divmerge"):
        StreamedMerge(base, experts)
    with pytest.raises(ValueError, match=rf"^{model_type}: "):
        learn(base, experts, prompts(vocab), steps=1, cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(ValueError, match=rf"^{model_type}: "):  # a teacher pass on its own, too
        teacher_pass(experts[0], prompts(vocab)[0], tmp_path / "cache", TeacherSpec())
    # the CLI: one line, exit 2, nothing written
    files = []
    for t, ps in enumerate(prompts(vocab)):
        (tmp_path / f"task{t}.jsonl").write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in ps))
        files.append(f"task{t}.jsonl")
    models = [{"model": str(e), "data": f} for e, f in zip(experts, files, strict=True)]
    (tmp_path / "dm.yml").write_text(yaml.safe_dump({"base_model": str(base), "models": models, "steps": 1}))
    capsys.readouterr()
    assert main(["divmerge", str(tmp_path / "dm.yml"), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"blockmerge divmerge: error: {model_type}: ") and "\n" not in err
    assert not (tmp_path / "out").exists()


def linear_modules(model) -> list[str]:
    """The names of the model's Linear modules but the head: PEFT's all-linear without the parameter targets
    (fused experts, routers) it adds on MoE models."""
    head = model.get_output_embeddings()
    linear = (n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head)
    return sorted({n.rpartition(".")[2] for n in linear})


def write_adapters(root, base_dir, targets=None) -> list:
    """T PEFT LoRA adapters (all linear layers of the decoder, or `targets`, random B) on the base."""
    from peft import LoraConfig, get_peft_model

    dirs = []
    for t in range(T):
        model = AutoModelForCausalLM.from_pretrained(base_dir).float()
        torch.manual_seed(10 + t)
        tm = targets(model) if targets else "all-linear"
        cfg = LoraConfig(r=2, lora_alpha=4, target_modules=tm, target_parameters=[], init_lora_weights=False)
        peft = get_peft_model(model, cfg)
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "lora_B" in n:
                    p.mul_(5.0)
        peft.save_pretrained(root / f"adapter{t}")
        dirs.append(root / f"adapter{t}")
    return dirs


def lora_reference(base, adapters, gamma, batch, dtype=torch.float64):
    """JS loss and dL/dGamma by autograd through transformers' model on W0 + sum_t Gamma s_t B_t A_t."""
    from blockmerge.lora.adapter import read_adapter

    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager").to(dtype).eval()
    blocks = [b.name for b in Checkpoint(base).blocks()]
    G = gamma.clone().to(dtype).requires_grad_()
    params = {k: v.detach() for k, v in model.named_parameters()}
    for t, d in enumerate(adapters):
        for mod, m in read_adapter(d).modules.items():
            k = f"{mod}.weight"
            params[k] = params[k] + G[t, blocks.index(block_name(k))] * m.delta(dtype)
    logits = functional_call(model, params, (batch.input_ids,)).logits
    logq = torch.log_softmax(logits[batch.rows, batch.cols], -1)
    loss = (divergence(logq, batch.targets, "js") * batch.weights.to(dtype)).sum()
    loss.backward()
    return float(loss.detach()), G.grad


@pytest.mark.parametrize("model_type", EXACT)
def test_family_lora_divmerge_equals_transformers(model_type, tmp_path):
    from blockmerge.lora.learn import StreamedLoraMerge
    from blockmerge.lora.learn import learn as lora_learn
    from peft import PeftModel

    base, _, vocab = write_family(tmp_path, model_type)
    adapters = write_adapters(tmp_path, base, linear_modules if model_type in MOE else None)
    # float64: a tight check; transformers' fused experts (grouped_mm) run in float32 at most (gradient within
    # 1e-4 of its largest entry)
    dtype, rel, gtol = (torch.float32, 1e-5, 1e-4) if model_type in MOE else (torch.float64, 1e-6, 1e-5)
    sm = StreamedLoraMerge(base, adapters, token_chunk=3, dtype=dtype)
    spec = TeacherSpec(max_new_tokens=5, eos_token_id=None, full_vocab_max=4096)
    data = TeacherData(teacher_folders(sm, prompts(vocab), tmp_path / "cache", spec, False))
    # the teacher of task t is base + adapter t: PEFT's model, teacher-forced
    for t in range(T):
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base).float(), adapters[t]).eval()
        tokens, plen, targets = data.get(t, 1)
        with torch.no_grad():
            p = torch.softmax(peft(tokens[None]).logits[0, plen - 1 : len(tokens) - 1], -1)
        torch.testing.assert_close(targets.probs.float(), p, rtol=1e-4, atol=1e-5)
    batch = make_batch([(0, 0), (1, 2), (0, 3), (1, 1)], data)
    gamma = torch.rand((T, len(sm.blocks)), generator=torch.Generator().manual_seed(5)) * 0.8
    loss, grad = sm.loss_and_grad(gamma, batch, "js")
    ref_loss, ref_grad = lora_reference(base, adapters, gamma, batch, dtype)
    assert float(ref_grad.abs().max()) > 0
    assert loss == pytest.approx(ref_loss, rel=rel)
    torch.testing.assert_close(grad.to(dtype), ref_grad, rtol=1e-5, atol=gtol * float(ref_grad.abs().max()))
    res = lora_learn(base, adapters, prompts(vocab), steps=1, batch_size=8, max_new_tokens=3, eos_token_id=None,
                     cache_dir=tmp_path / "cache2", progress=False)  # fmt: skip
    assert len(res.losses) == 1


def test_lora_on_fused_experts_is_refused(tmp_path):
    """PEFT's all-linear on Mixtral adds LoRA on the fused experts and the router (target_parameters)."""
    from blockmerge.lora.adapter import AdapterError
    from blockmerge.lora.learn import StreamedLoraMerge
    from peft import LoraConfig, get_peft_model

    base, _, _ = write_family(tmp_path, "mixtral")
    model = AutoModelForCausalLM.from_pretrained(base).float()
    get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear")).save_pretrained(tmp_path / "a")
    with pytest.raises(AdapterError, match=r"adapter_config.json: target_parameters \[.*gate_up_proj.*not supported"):
        StreamedLoraMerge(base, [tmp_path / "a"])


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_fused_experts_are_transformers_parameters(model_type, tmp_path):
    """The checkpoint's per-expert tensors, fused by blockmerge.learn.fused, are the parameters transformers'
    from_pretrained loads (same names, same values), and the fusion keeps the tensors' gradients."""
    from blockmerge.learn.fused import ModuleLayout

    base, _, _ = write_family(tmp_path, model_type)
    model = AutoModelForCausalLM.from_pretrained(base).float()
    ckpt = Checkpoint(base)
    tensors = {n: ckpt.get(n).float().requires_grad_() for n in ckpt.tensors}
    layout = ModuleLayout(model, list(tensors))
    assert layout.fusions and all(len(layout.members(f)) > 1 for f in layout.fusions)
    got = layout.to_modules(tensors)
    want = dict(model.named_parameters())
    assert set(got) == set(want)
    for n, p in want.items():
        torch.testing.assert_close(got[n], p, rtol=0, atol=0)
    fused = next(iter(layout.fusions))
    got[fused].sum().backward()
    assert all(torch.equal(tensors[n].grad, torch.ones_like(tensors[n])) for n in layout.members(fused))


def test_guard_refuses_a_conversion_it_cannot_differentiate(tmp_path, monkeypatch):
    """A converter with an operation outside the known differentiable ones is refused, not run without grad."""
    from blockmerge.learn import fused, guard
    from transformers.core_model_loading import MergeModulelist

    base, experts, _ = write_family(tmp_path, "mixtral")
    monkeypatch.setattr(guard, "_checked", {})
    monkeypatch.setattr(fused, "_differentiable_ops", lambda: (MergeModulelist,))
    with pytest.raises(ValueError, match=r"^mixtral: the streamed forward fails .*Concatenate is not supported"):
        StreamedMerge(base, experts)
