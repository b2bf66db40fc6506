"""blockmerge.suite.llm: exact answers and disjoint splits, answer-only labels, batched (left-padded) greedy
decoding against one-prompt-at-a-time decoding, task-vector statistics against direct formulas, and the
teacher-forced JS diagnostic against its definition. On the tiny random Llama with a word tokenizer."""

from __future__ import annotations

import re

import pytest
import torch
from blockmerge.suite import llm as ls
from blockmerge.suite import llm_diagnose, llm_tasks, llm_train
from blockmerge.suite.protocol import TaskSuite
from safetensors.torch import load_file, save_file

TASKS = ["sentiment", "topic", "entailment", "grammar", "largest", "nth_word"]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    base = llm_train.build_tiny_base(root / "base", TASKS)
    return ls.LlmSuite(base, root, TASKS, ls.SuiteSizes(n_test=30, n_val=20))


def independent_answer(task: str, prompt: str) -> str:
    """Each task's answer recomputed from the prompt text alone."""
    text = prompt.rsplit("\n", 1)[0]
    if task == "largest":
        return str(max(int(x) for x in re.findall(r"\d+", text)))
    if task == "nth_word":
        words = re.search(r"Words: (.*)\n", text).group(1).split()
        return words[{"first": 0, "second": 1, "last": -1}[text.split("Position: ")[1]]]
    if task == "entailment":
        bought = re.search(r"Premise: \w+ bought a \w+ (\w+) and a \w+ (\w+)\.", text).groups()
        return "apple" if re.search(r"Hypothesis: \w+ bought a (\w+)\.", text).group(1) in bought else "pear"
    if task == "grammar":
        subject, verb = re.search(r"The (\w+) (\w+) ", text).groups()
        plural = subject in {p for _, p in llm_tasks.SUBJECTS}
        return "gold" if plural == (verb in {v for _, v in llm_tasks.VERBS}) else "silver"
    if task == "sentiment":
        return "blue" if set(re.findall(r"\w+", text)) & set(llm_tasks.POSITIVE) else "red"
    topic = next(t for t, phrases in llm_tasks.TOPICS.items() if any(p in text for p in phrases))
    return llm_tasks.TOPIC_CODES[topic]


def test_exact_answers_and_disjoint_splits(suite):
    assert isinstance(suite, TaskSuite)
    for t in TASKS:
        test, val = suite.pairs(t, "test"), suite.pairs(t, "val")
        assert len({p for p, _ in test}) == 30 and len({p for p, _ in val}) == 20
        assert not {p for p, _ in test} & {p for p, _ in val}
        assert not set(suite.unlabeled(t, 40)) & suite.held_out(t)
        for prompt, answer in test + val:
            assert answer == independent_answer(t, prompt), (t, prompt)
        labels = {a for _, a in test}
        if ls.TASKS[t].labels:
            assert labels <= set(ls.TASKS[t].labels) and len(labels) == len(ls.TASKS[t].labels)
        train = [next(s) for s in [suite.train_stream(t)] for _ in range(50)]
        assert not {p for p, _ in train} & suite.held_out(t)
    # one token per label word, so a classification answer is one token + EOS
    assert suite.max_new_tokens("sentiment") == 2


def test_training_batch_labels_answer_and_eos_only(suite):
    pairs = suite.pairs("largest", "test")[:3]
    ids, mask, lab = llm_train.training_batch(suite, pairs, "cpu")
    for i, (prompt, answer) in enumerate(pairs):
        p, a = suite.encode_prompt(prompt), suite.encode_answer(answer)
        n = len(p) + len(a) + 1
        assert ids[i, :n].tolist() == p + a + [suite.eos_token_id] and int(mask[i].sum()) == n
        assert lab[i].tolist() == [-100] * len(p) + a + [suite.eos_token_id] + [-100] * (ids.shape[1] - n)


def test_batched_greedy_equals_one_at_a_time(suite):
    torch.manual_seed(0)
    model = ls.load_causal_lm(suite.base)
    prompts = [p for t in ("sentiment", "largest", "entailment") for p, _ in suite.pairs(t, "test")[:4]]
    batched = ls.greedy_answers(model, suite, prompts, 4, batch_size=16)
    single = []
    for p in prompts:
        ids = torch.tensor([suite.encode_prompt(p)])
        gen = []
        for _ in range(4):
            nxt = int(model(input_ids=torch.tensor([ids[0].tolist() + gen])).logits[0, -1].argmax())
            if nxt == suite.eos_token_id:
                break
            gen.append(nxt)
        single.append(suite.decode_answer(gen))
    assert batched == single


def test_task_vector_stats(suite, tmp_path):
    base = load_file(str(suite.base / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    experts = {}
    for i, name in enumerate(["a", "b"]):
        d = tmp_path / name
        d.mkdir()
        tensors = {k: v + (torch.randn(v.shape, generator=g) * 1e-3 if k.endswith("q_proj.weight") else 0) * (i + 1)
                   for k, v in base.items()}  # fmt: skip
        save_file(tensors, str(d / "model.safetensors"))
        experts[name] = d
    stats = ls.task_vector_stats(suite.base, experts)
    taus = {n: torch.cat([(v - base[k]).flatten() for k, v in load_file(str(d / "model.safetensors")).items()])
            for n, d in experts.items()}  # fmt: skip
    base_norm = torch.cat([v.flatten() for v in base.values()]).double().norm()
    for n, tau in taus.items():
        assert stats["relative_norm"][n] == pytest.approx(float(tau.double().norm() / base_norm), rel=1e-6)
        assert stats["fraction_changed"][n] == pytest.approx(float((tau != 0).double().mean()))
    cos = torch.nn.functional.cosine_similarity(taus["a"].double(), taus["b"].double(), dim=0)
    assert stats["cosine"]["a"]["b"] == pytest.approx(float(cos), abs=1e-9)


def test_teacher_forced_js(suite):
    torch.manual_seed(0)
    expert = ls.load_causal_lm(suite.base)
    same = llm_diagnose.teacher_forced_js(
        expert, expert, suite, [p for p, _ in suite.pairs("sentiment", "test")[:5]], 2
    )
    assert same["js_first"] == pytest.approx(0.0, abs=1e-7) and sum(same["n_positions"].values()) >= 5
    # against the definition at the first answer position of one prompt
    torch.manual_seed(1)
    other = ls.load_causal_lm(suite.base)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    prompt = suite.pairs("sentiment", "test")[0][0]
    got = llm_diagnose.teacher_forced_js(other, expert, suite, [prompt], 1)
    ids = torch.tensor([suite.encode_prompt(prompt)])
    with torch.no_grad():
        p, q = expert(input_ids=ids).logits[0, -1].softmax(-1), other(input_ids=ids).logits[0, -1].softmax(-1)
    m = (p + q) / 2
    js = 0.5 * float((p * (p / m).log()).sum() + (q * (q / m).log()).sum())
    assert got["js_first"] == pytest.approx(js, rel=1e-4) and got["expert_confidence"] == pytest.approx(float(p.max()))
