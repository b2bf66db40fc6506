"""The synthetic task suite: exact tasks, tokenizer, evaluation arithmetic, and a micro suite whose
checkpoints go through blockmerge's merges like any other model."""

from __future__ import annotations

import json
import random

import pytest
import torch
from blockmerge import tasks as T
from blockmerge.evaluate import accuracy, anp, greedy_decode, load_model, normalized, task_subsets


def test_tasks_are_exact_and_deterministic():
    rng = random.Random(0)
    for task in T.TASKS:
        for _ in range(200):
            prompt, answer = task.example(rng)
            assert prompt[0] == task.tag and prompt.endswith("=")
            x = prompt[1:-1]
            if task.name == "copy":
                assert answer == x
            elif task.name == "reverse":
                assert answer == x[::-1]
            elif task.name == "sort":
                assert answer == "".join(sorted(x))
            elif task.name == "add":
                a, b = x.split("+")
                assert int(answer) == int(a) + int(b)
            elif task.name == "count":
                assert int(answer) == x.count("a") and set(x) <= {"a", "b", "c"}
            elif task.name == "successor":
                assert int(answer) == int(x) + 1
            elif task.name == "map":
                assert answer == "".join(T.CIPHER[c] for c in x)
            elif task.name == "rotate":
                assert answer == x[1:] + x[0]
            assert len(answer) <= T.MAX_ANSWER
            sib_prompt, sib = task.example(random.Random(len(prompt)), sibling=True)
            assert len(sib) <= T.MAX_ANSWER and sib == task.sibling(sib_prompt[1:-1])
    # the base is pretrained on the siblings: they (almost) never agree with the task itself
    for task in T.TASKS:
        test, _ = T.eval_sets(task.name, 100, 0, seed=0)
        assert sum(task.sibling(p[1:-1]) == a for p, a in test) <= 5, task.name
    assert len(T.TASKS) >= 8 and len(set(T.TAGS)) == len(T.TASKS)
    a = T.eval_sets("sort", 30, 10, seed=3)
    b = T.eval_sets("sort", 30, 10, seed=3)
    assert a == b and T.eval_sets("sort", 30, 10, seed=4) != a
    test, val = a
    assert len({p for p, _ in test + val}) == 40  # distinct, val disjoint from test
    # both splits are dealt from the same stream in proportion: short inputs land in both
    test, val = T.eval_sets("count", 100, 50, seed=0)
    assert len(test) == 100 and len(val) == 50
    assert min(len(p) for p, _ in val) == min(len(p) for p, _ in test)
    held = {p for p, _ in test + val}
    stream = T.TrainStream("sort", 3, held)
    assert all(stream.next()[0] not in held for _ in range(300))


def test_tokenizer_round_trip(tmp_path):
    tok = T.CharTokenizer()
    assert len(tok) == len(T.VOCAB) and tok.encode("=")[0] == T.VOCAB.index("=")
    text = "Sbca=abc"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == T.BOS_ID and ids[-1] == T.EOS_ID
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode("ab", eos=True) + tok.encode("zz")) == "ab"  # stops at EOS
    with pytest.raises(ValueError, match="not in the task vocabulary"):
        tok.encode("A!")
    tok.save_hf(tmp_path)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf("Sbca=abc")["input_ids"] == tok.encode(text, bos=True)
    assert hf.decode(tok.encode(text), skip_special_tokens=True) == text
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (T.EOS_ID, T.PAD_ID, T.BOS_ID)


class ScriptedModel(torch.nn.Module):
    """A 'model' whose greedy output for each prompt is fixed in advance: the answer, or a wrong one."""

    def __init__(self, answers: dict[tuple[int, ...], list[int]]):
        super().__init__()
        self.answers = answers
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, past_key_values=None, use_cache=True):
        from types import SimpleNamespace

        if past_key_values is None:
            past_key_values = [tuple(r) for r in input_ids.tolist()]
            step = 0
        else:
            past_key_values, step = past_key_values
            step += 1
        logits = torch.full((input_ids.shape[0], 1, len(T.VOCAB)), -1.0)
        for b, prompt in enumerate(past_key_values):
            seq = self.answers[prompt] + [T.EOS_ID]
            logits[b, 0, seq[min(step, len(seq) - 1)]] = 1.0
        return SimpleNamespace(logits=logits, past_key_values=(past_key_values, step))


def test_evaluation_of_a_known_model():
    tok = T.CharTokenizer()
    pairs = T.eval_sets("reverse", 20, 0, seed=0)[0] + T.eval_sets("add", 20, 0, seed=0)[0]
    answers = {}
    for i, (p, a) in enumerate(pairs):
        answers[tuple(tok.encode(p, bos=True))] = tok.encode(a if i % 4 else a + "x")  # every 4th wrong
    model = ScriptedModel(answers)
    gens = greedy_decode(model, [tok.encode(p, bos=True) for p, _ in pairs], eos_token_id=T.EOS_ID, batch_size=7)
    assert tok.decode(gens[1]) == pairs[1][1]
    assert accuracy(model, pairs, tok) == pytest.approx(0.75)
    merged, expert = {"a": 0.45, "b": 0.2, "c": 0.5}, {"a": 0.9, "b": 0.8, "c": 0.0}
    assert normalized(merged, expert) == pytest.approx({"a": 0.5, "b": 0.25, "c": 0.0})
    assert anp(merged, expert) == pytest.approx(0.25)
    names = [t.name for t in T.TASKS]
    assert len(task_subsets(names, 8, 3)) == 1
    s4 = task_subsets(names, 4, 3, seed=0)
    assert len(s4) == 3 and len(set(s4)) == 3 and all(len(s) == 4 for s in s4)
    assert s4 == task_subsets(names, 4, 3, seed=0)


MICRO = dict(
    hidden=16, layers=2, heads=2, intermediate=32, base_steps=6, expert_steps=4, batch_size=8, n_test=8, n_val=4
)
MICRO_TASKS = ("copy", "add")


@pytest.fixture(scope="module")
def micro_suite(tmp_path_factory):
    from blockmerge.suite import SuiteConfig, build_suite

    cache = tmp_path_factory.mktemp("cache")
    cfg = SuiteConfig(tasks=MICRO_TASKS, **MICRO)
    return build_suite(cache, cfg, log=lambda s: None)


def test_micro_suite_build_and_reuse(micro_suite):
    from blockmerge.suite import SuiteConfig, build_suite
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = micro_suite
    manifest = json.loads((s.root / "manifest.json").read_text())
    assert set(manifest["expert_accuracy"]) == set(MICRO_TASKS)
    for d in [s.base] + [s.expert(t) for t in s.config.tasks]:
        assert (d / "config.json").exists() and (d / "model.safetensors").exists()
        AutoTokenizer.from_pretrained(d)
    AutoModelForCausalLM.from_pretrained(s.expert("copy"))
    assert not [p for p in s.root.parent.iterdir() if ".tmp" in p.name]  # atomic: no temp folder left
    # reuse: same config -> same folder, nothing rebuilt
    mtime = (s.root / "manifest.json").stat().st_mtime_ns
    again = build_suite(s.root.parent, SuiteConfig(tasks=MICRO_TASKS, **MICRO), log=lambda m: None)
    assert again.root == s.root and (s.root / "manifest.json").stat().st_mtime_ns == mtime
    # deterministic from the seed: rebuilding gives bit-identical weights
    from safetensors.torch import load_file

    before = load_file(s.expert("add") / "model.safetensors")
    build_suite(s.root.parent, s.config, rebuild=True, log=lambda m: None)
    after = load_file(s.expert("add") / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_micro_suite_goes_through_blockmerge(micro_suite, tmp_path):
    from blockmerge.demo import Comparison, Settings, format_table, static_config

    s = micro_suite
    subset = ("copy", "add")
    cfg = static_config("average", s, subset, Settings())
    assert cfg["merge_method"] == "linear" and len(cfg["models"]) == 2
    cmp = Comparison(
        s, Settings(ta_lambdas=(0.5, 1.0), learn_steps=2, learn_batch=4, n_unlabeled=4), log=lambda m: None
    )
    methods = ["average", "task_arithmetic", "ties", "dare_ties", "divmerge_js_layer", "adamerging_task"]
    rows = cmp.run(subset, methods)
    assert [r["method"] for r in rows] == methods
    for r in rows:
        assert set(r["norm"]) == set(subset) and 0.0 <= r["anp"]
        assert r["anp"] == pytest.approx(sum(r["norm"].values()) / 2)
    assert rows[1]["lambda"] in (0.5, 1.0)
    assert "| divmerge_js_layer |" in format_table(rows, subset)
    # the average merge, recomputed in memory from the checkpoints, matches what blockmerge wrote
    from blockmerge.merge import run_merge

    out = run_merge(cfg, tmp_path / "avg", progress=False)
    merged = load_model(out)
    a, b = load_model(s.expert("copy")), load_model(s.expert("add"))
    for (n, p), q, r in zip(merged.named_parameters(), a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, (q + r) / 2, rtol=1e-6, atol=1e-6, msg=n)
