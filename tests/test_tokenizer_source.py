"""tokenizer_source (base | union | model): experts with added tokens, rows mapped by token string."""

import pytest
import torch
from blockmerge.io.checkpoint import Checkpoint
from blockmerge.merge.config import ConfigError
from blockmerge.merge.run import run_merge
from blockmerge.suite.synth import tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

V = 97  # tiny llama vocabulary
EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
W = [0.5, 0.3]


def _tokenizer(ids: dict[str, int], added: list[str]) -> PreTrainedTokenizerFast:
    t = Tokenizer(models.WordLevel(ids, unk_token="t0"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="t0")
    tok.add_tokens(added, special_tokens=True)
    return tok


def _save(path, seed, ids, added, rows, noise_seed=None):
    m = tiny_model("llama", seed=0)
    if noise_seed is not None:
        g = torch.Generator().manual_seed(noise_seed)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    if rows != V:
        m.resize_token_embeddings(rows)
        with torch.no_grad():  # distinct rows for the added tokens
            g = torch.Generator().manual_seed(seed)
            m.get_input_embeddings().weight[V:] = torch.randn(rows - V, 48, generator=g)
            m.get_output_embeddings().weight[V:] = torch.randn(rows - V, 48, generator=g)
    m.save_pretrained(path)
    _tokenizer(ids, added).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    plain = {f"t{k}": k for k in range(V)}
    shifted = {f"t{k}": (k + 5) % V for k in range(V)}  # the same tokens under other ids
    base = _save(root / "base", 0, plain, [], V)
    e1 = _save(root / "e1", 1, plain, ["<|a|>", "<|b|>"], V + 2, noise_seed=11)
    e2 = _save(root / "e2", 2, shifted, ["<|b|>", "<|c|>"], V + 2, noise_seed=12)
    with torch.no_grad():  # e2's rows follow its shifted ids
        sd = {n: Checkpoint(e2).get(n) for n in (EMB, HEAD)}
        m = AutoModelForCausalLM.from_pretrained(e2)
        for n, p in ((EMB, m.get_input_embeddings().weight), (HEAD, m.get_output_embeddings().weight)):
            p[[(k + 5) % V for k in range(V)]] = sd[n][:V].clone()
        m.save_pretrained(e2)
    return base, e1, e2


def _cfg(base, e1, e2, source):
    d = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": {"weight": w}} for e, w in zip((e1, e2), W, strict=True)],
    }
    if source is not None:
        d["tokenizer_source"] = source
    return d


def _rows(path, name, tokens):
    tok, t = AutoTokenizer.from_pretrained(path), Checkpoint(path).get(name)
    vocab = tok.get_vocab()
    return {s: t[vocab[s]] for s in tokens if s in vocab}


def _task_arithmetic(b, es):
    return b + sum(w * (e - b) for w, e in zip(W, es, strict=True))


@pytest.mark.parametrize("name", [EMB, HEAD])
def test_base_source_keeps_base_vocabulary(fam, tmp_path, name):
    base, e1, e2 = fam
    out = run_merge(_cfg(base, e1, e2, "base"), tmp_path / "o", progress=False)
    got = Checkpoint(out).get(name)
    assert got.shape == (V, 48)
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == V
    shared = [f"t{k}" for k in range(V)]
    b, r1, r2 = (_rows(p, name, shared) for p in (base, e1, e2))
    want = torch.stack([_task_arithmetic(b[s], [r1[s], r2[s]]) for s in shared])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(base).get_vocab()


def test_union_adds_new_tokens_and_follows_the_missing_token_rule(fam, tmp_path):
    base, e1, e2 = fam
    out = run_merge(_cfg(base, e1, e2, "union"), tmp_path / "o", progress=False)
    tok = AutoTokenizer.from_pretrained(out)
    # base's ids first, then the new tokens in model order
    assert [tok.convert_tokens_to_ids(s) for s in ("t3", "<|a|>", "<|b|>", "<|c|>")] == [3, V, V + 1, V + 2]
    assert tok("t1 <|c|> t2 <|a|>")["input_ids"] == [1, V + 2, 2, V]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == V + 3
    assert model(torch.tensor([[1, V + 2, V]])).logits.shape == (1, 3, V + 3)
    for name in (EMB, HEAD):
        got = Checkpoint(out).get(name)
        assert got.shape == (V + 3, 48)
        shared = [f"t{k}" for k in range(V)]
        b, r1, r2 = (_rows(p, name, [*shared, "<|a|>", "<|b|>", "<|c|>"]) for p in (base, e1, e2))
        want = torch.stack([_task_arithmetic(b[s], [r1[s], r2[s]]) for s in shared])
        torch.testing.assert_close(got[:V], want, rtol=0, atol=1e-6)
        # a token one model has: every model takes its row, so any weights give that row back
        torch.testing.assert_close(got[V], r1["<|a|>"], rtol=0, atol=1e-6)
        torch.testing.assert_close(got[V + 2], r2["<|c|>"], rtol=0, atol=1e-6)
        # a token two experts have and the base lacks: the base takes their mean, then the method runs
        mean = (r1["<|b|>"] + r2["<|b|>"]) / 2
        torch.testing.assert_close(got[V + 1], _task_arithmetic(mean, [r1["<|b|>"], r2["<|b|>"]]), rtol=0, atol=1e-6)


def test_model_source_takes_that_models_vocabulary(fam, tmp_path):
    base, e1, e2 = fam
    out = run_merge(_cfg(base, e1, e2, str(e1)), tmp_path / "o", progress=False)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(e1).get_vocab()
    got = Checkpoint(out).get(EMB)
    assert got.shape == (V + 2, 48)
    b, r1, r2 = (_rows(p, EMB, ["t7", "<|b|>"]) for p in (base, e1, e2))
    torch.testing.assert_close(got[7], _task_arithmetic(b["t7"], [r1["t7"], r2["t7"]]), rtol=0, atol=1e-6)
    mean = (r1["<|b|>"] + r2["<|b|>"]) / 2
    torch.testing.assert_close(got[V + 1], _task_arithmetic(mean, [r1["<|b|>"], r2["<|b|>"]]), rtol=0, atol=1e-6)


def test_mismatched_vocabulary_without_tokenizer_source_is_a_one_line_error(fam, tmp_path):
    base, e1, e2 = fam
    with pytest.raises(ConfigError) as ei:
        run_merge(_cfg(base, e1, e2, None), tmp_path / "o", progress=False)
    msg = str(ei.value)
    assert "\n" not in msg and "lm_head.weight" in msg and "tokenizer_source: union" in msg
    assert list(tmp_path.iterdir()) == []


def test_union_without_base_model_averages_the_models_that_have_the_token(fam, tmp_path):
    base, e1, e2 = fam
    weights = [1.0, 1.0, 2.0]
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": str(m), "parameters": {"weight": w}} for m, w in zip((base, e1, e2), weights, strict=True)
        ],
        "tokenizer_source": "union",
    }
    out = run_merge(cfg, tmp_path / "o", progress=False)
    got = Checkpoint(out).get(HEAD)
    b, r1, r2 = (_rows(p, HEAD, ["t4", "<|a|>", "<|b|>"]) for p in (base, e1, e2))
    lin = lambda rows: sum(w * r for w, r in zip(weights, rows, strict=True)) / sum(weights)  # noqa: E731
    torch.testing.assert_close(got[4], lin([b["t4"], r1["t4"], r2["t4"]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(got[V], r1["<|a|>"], rtol=0, atol=1e-6)
    mean = (r1["<|b|>"] + r2["<|b|>"]) / 2
    torch.testing.assert_close(got[V + 1], lin([mean, r1["<|b|>"], r2["<|b|>"]]), rtol=0, atol=1e-6)
