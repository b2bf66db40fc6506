"""Evaluation of the task suite: greedy decoding, exact-match accuracy, normalised accuracy and ANP
(average normalised performance) over subsets of k tasks."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from blockmerge.learn.model import cache_kwarg
from blockmerge.suite.tasks import MAX_ANSWER, CharTokenizer


def load_model(path: str | Path, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    return model.to(device).eval()


def _cache_of(out):
    """The KV cache of a model output: `cache` since transformers 5.24, `past_key_values` before."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def greedy_decode(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = MAX_ANSWER + 1,
    eos_token_id: int = 2,
    batch_size: int = 256,
) -> list[list[int]]:
    """Greedy continuations (without the prompt, up to and excluding EOS). Prompts are grouped by length,
    so no padding is ever needed; a KV cache makes each new token one cheap step."""
    device = next(model.parameters()).device
    out: list[list[int] | None] = [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for _, idx in sorted(by_len.items()):
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            ids = torch.tensor([list(prompts[i]) for i in chunk], dtype=torch.long, device=device)
            res = model(input_ids=ids, use_cache=True)
            past = _cache_of(res)
            nxt = res.logits[:, -1].argmax(-1)
            gen = [nxt]
            done = nxt == eos_token_id
            for _ in range(max_new_tokens - 1):
                if bool(done.all()):
                    break
                res = model(input_ids=nxt[:, None], use_cache=True, **{cache_kwarg(model.forward): past})
                past = _cache_of(res)
                nxt = res.logits[:, -1].argmax(-1)
                gen.append(nxt)
                done |= nxt == eos_token_id
            toks = torch.stack(gen, 1).tolist()
            for row, i in zip(toks, chunk, strict=True):
                out[i] = row[: row.index(eos_token_id)] if eos_token_id in row else row
    return out  # type: ignore[return-value]


class PromptCodec(Protocol):
    """What scoring needs from a suite (a TaskSuite) or a tokenizer (tasks.CharTokenizer)."""

    eos_token_id: int

    def encode_prompt(self, prompt: str) -> list[int]: ...

    def decode_answer(self, ids: Sequence[int]) -> str: ...


def accuracy(
    model,
    pairs: Sequence[tuple[str, str]],
    codec: PromptCodec | None = None,
    max_new_tokens: int = MAX_ANSWER + 1,
) -> float:
    """Exact-match accuracy of greedy decoding on (prompt, answer) pairs: at most `max_new_tokens` tokens are
    generated (the longest answer + EOS; a TaskSuite gives it per task), and an answer counts only if the
    model also stopped (EOS) within them, so a truncated longer output never matches."""
    codec = codec or CharTokenizer()
    prompts = [codec.encode_prompt(p) for p, _ in pairs]
    gens = greedy_decode(model, prompts, max_new_tokens=max_new_tokens, eos_token_id=codec.eos_token_id)
    hits = sum(len(g) < max_new_tokens and codec.decode_answer(g) == a for g, (_, a) in zip(gens, pairs, strict=True))
    return hits / max(1, len(pairs))


def normalized(merged: dict[str, float], expert: dict[str, float]) -> dict[str, float]:
    """merged accuracy / expert accuracy per task (an expert at 0 counts as 0 rather than dividing by 0)."""
    return {t: (merged[t] / expert[t] if expert[t] > 0 else 0.0) for t in merged}


def anp(merged: dict[str, float], expert: dict[str, float]) -> float:
    """Average normalised performance: mean over tasks of merged / expert accuracy."""
    n = normalized(merged, expert)
    return sum(n.values()) / max(1, len(n))


def task_subsets(names: Sequence[str], k: int, n_samples: int | None = 3, seed: int = 0) -> list[tuple[str, ...]]:
    """Subsets of k tasks: all of them when there are at most n_samples, else n_samples distinct ones
    drawn with a seeded RNG (the same for every method, so methods are compared on the same subsets)."""
    combos = list(itertools.combinations(names, k))
    if n_samples is None or len(combos) <= n_samples:
        return combos
    rng = random.Random(f"subsets/{seed}/{k}")
    return sorted(rng.sample(combos, n_samples), key=combos.index)
