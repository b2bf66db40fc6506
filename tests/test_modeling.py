"""Streamed block-by-block forward == transformers' full model; greedy generation and the teacher cache."""

from __future__ import annotations

import pytest
import torch
from blockmerge.learn.losses import Targets
from blockmerge.learn.model import StreamedModel
from blockmerge.learn.teacher import TeacherData, TeacherSpec, generate, teacher_pass
from blockmerge.suite.synth import make_family
from transformers import AutoModelForCausalLM

ARCHS = ["llama", "qwen2", "mistral", "gpt2"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {a: make_family(root / a, a, n_experts=1, tau_scale=0.05) for a in ARCHS}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_forward_matches_full_model(families, arch, impl):
    base, _ = families[arch]
    full = AutoModelForCausalLM.from_pretrained(base, attn_implementation=impl).eval()
    sm = StreamedModel(base, attn_implementation=impl)
    assert sm.tied == (arch == "gpt2")
    ids = torch.randint(0, 97, (3, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = full(ids).logits
    out = sm.forward(ids)  # streamed from disk, one block at a time
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out_resident = sm.forward(ids, source=sm.source(resident_max_bytes=1 << 30))
    torch.testing.assert_close(out_resident, ref, rtol=1e-5, atol=1e-5)


def test_mistral_sliding_window_matches_full_model(tmp_path):
    base, _ = make_family(tmp_path, "mistral", n_experts=1, sliding_window=4)
    full = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager").eval()
    sm = StreamedModel(base, attn_implementation="eager")
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = full(ids).logits
    torch.testing.assert_close(sm.forward(ids), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_generation_matches_transformers(families, arch):
    _, (expert,) = families[arch]
    full = AutoModelForCausalLM.from_pretrained(expert).eval()
    sm = StreamedModel(expert)
    prompts = torch.randint(2, 97, (3, 5), generator=torch.Generator().manual_seed(2))
    new, logps = generate(sm, sm.source(), prompts, max_new_tokens=6, eos_token_id=None)
    with torch.no_grad():
        ref = full.generate(prompts, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
        ref_logits = full(ref).logits
    assert torch.equal(new, ref[:, 5:])
    for i, lp in enumerate(logps):  # the step-i distribution is the teacher-forced one at position 4+i
        torch.testing.assert_close(lp, torch.log_softmax(ref_logits[:, 4 + i], -1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("full_vocab_max", [4096, 10])
def test_teacher_cache_round_trip(families, tmp_path, full_vocab_max):
    _, (expert,) = families["llama"]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 97, (int(n),), generator=g).tolist() for n in torch.randint(2, 6, (9,), generator=g)]
    spec = TeacherSpec(max_new_tokens=5, eos_token_id=1, full_vocab_max=full_vocab_max, topk=7, chunk_seqs=4)
    folder = teacher_pass(expert, prompts, tmp_path, spec)
    mtime = (folder / "manifest.json").stat().st_mtime_ns
    assert teacher_pass(expert, prompts, tmp_path, spec) == folder  # reused, not regenerated
    assert (folder / "manifest.json").stat().st_mtime_ns == mtime
    data = TeacherData([folder])
    assert data.n_seqs(0) == len(prompts) and len(list(folder.glob("chunk*.pt"))) == 3
    full = AutoModelForCausalLM.from_pretrained(expert).eval()
    seen = set()
    for j in range(len(prompts)):
        tokens, plen, targets = data.get(0, j)
        prompt = tokens[:plen].tolist()
        seen.add(tuple(prompt))
        cont = tokens[plen:]
        assert 1 <= len(cont) <= 5 and (1 not in cont[:-1].tolist())
        with torch.no_grad():
            logp = torch.log_softmax(full(tokens[None]).logits[0, plen - 1 : len(tokens) - 1], -1)
        assert torch.equal(logp.argmax(-1), cont)  # greedy continuation
        assert len(targets) == len(cont)
        if full_vocab_max >= 97:
            assert not targets.topk
            torch.testing.assert_close(targets.probs, logp.exp(), rtol=1e-4, atol=1e-6)
        else:
            assert targets.topk and targets.ids.shape == (len(cont), 7)
            top = logp.exp().topk(7, -1)
            torch.testing.assert_close(targets.probs, top.values, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(targets.tail, 1 - top.values.sum(-1), rtol=1e-3, atol=1e-5)
            assert isinstance(targets, Targets)
    assert seen == {tuple(p) for p in prompts}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_teacher_equals_one_prompt_at_a_time(families, tmp_path, arch):
    """Prompts of different lengths in one left-padded batch, rows stopping at EOS while others go on:
    the same continuations and distributions as generating each prompt alone, fully streamed."""
    _, (expert,) = families[arch]
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, 97, (int(n),), generator=g).tolist() for n in torch.randint(1, 9, (7,), generator=g)]
    sm = StreamedModel(expert)
    free, _ = generate(sm, sm.source(), [prompts[0]], max_new_tokens=6, eos_token_id=None)
    eos = int(free[0, 2])  # a token prompt 0 produces mid-continuation: its row stops early in the batch
    alone = TeacherSpec(max_new_tokens=6, eos_token_id=eos, gen_batch=1)
    batched = TeacherSpec(max_new_tokens=6, eos_token_id=eos, gen_batch=64)
    ref = TeacherData([teacher_pass(expert, prompts, tmp_path / "alone", alone, resident_max_bytes=0)])
    got = TeacherData([teacher_pass(expert, prompts, tmp_path / "batched", batched, resident_max_bytes=1 << 30)])
    lengths = set()
    for j in range(len(prompts)):
        (t0, p0, d0), (t1, p1, d1) = ref.get(0, j), got.get(0, j)
        assert p0 == p1 and torch.equal(t0, t1)
        torch.testing.assert_close(d1.probs, d0.probs, rtol=1e-5, atol=1e-6)
        lengths.add(len(t0) - p0)
    assert len(lengths) > 1 and len({len(p) for p in prompts}) > 1  # the test covers what it claims


def test_block_source_keeps_blocks_within_budget(families):
    base, _ = families["llama"]
    sm = StreamedModel(base)
    sizes = {b.name: sum(sm.ckpt.tensors[t].nbytes for t in b.tensors) for b in sm.blocks}
    assert sizes["layers.1"] > sizes["head"]
    budget = sizes["embed"] + sizes["layers.0"] + sizes["head"]  # layers 1 and 2 do not fit, the head does
    src = sm.source(budget)
    assert src.kept == {"embed", "layers.0", "head"} and not src.resident
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(sm.forward(ids, source=src), sm.forward(ids), rtol=0, atol=0)
    assert set(src._mem) == {"embed", "layers.0", "head"}
    assert sm.source(10**9).resident and sm.source(0).kept == set()
    wide = sm.source(budget, dtype=torch.float64)  # kept in the compute dtype: twice the bytes
    assert wide.kept == {"embed", "head"} and wide.resident_bytes == 2 * (sizes["embed"] + sizes["head"])


@pytest.mark.parametrize(
    "value, expected",
    [(123, 123), ("8GiB", 8 << 30), ("512MiB", 512 << 20), ("2GB", 2 * 10**9), ("1.5 GiB", 3 << 29), ("0", 0)],
)
def test_parse_memory(value, expected):
    from blockmerge.io.stream import parse_memory

    assert parse_memory(value) == expected


@pytest.mark.parametrize("value", ["8 parsecs", "-1GiB", -5, "GiB", 1.5])
def test_parse_memory_rejects(value):
    from blockmerge.io.stream import parse_memory

    with pytest.raises(ValueError, match="^memory: "):
        parse_memory(value)
