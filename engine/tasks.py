"""Synthetic text tasks with exact answers, and the character-level tokenizer they share.

Every example is ``<s> TAG input = output </s>`` at the character level, where TAG is one upper-case
letter naming the task. Generators are pure functions of a seed, so every split is reproducible.
Completion-only training puts the loss on ``output </s>`` only; evaluation greedily decodes after ``=``
and counts exact matches of the output string.

Each task also has a *sibling*: a related mapping of the same inputs (copy -> reverse, sort -> descending
sort, add -> a+b+1, ...). The suite's base model is pretrained on the siblings under the tasks' tags, so
it knows the format and the computations but none of the tasks themselves (accuracy near 0), and each
expert only has to re-map its tag: a small task vector, as when fine-tuning a real pretrained model.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIALS = [PAD, BOS, EOS]
SEP = "="
TAGS = "CRSANUMT"  # one per task, see TASKS
CHARS = list(string.digits) + list(string.ascii_lowercase) + list(TAGS) + [SEP, "+"]
VOCAB = SPECIALS + CHARS  # 3 + 10 + 26 + 8 + 2 = 49 tokens
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
LETTERS = string.ascii_lowercase
# fixed substitution cipher for the `map` task (a property of the task, not of the seed)
_perm = list(LETTERS)
random.Random(1234).shuffle(_perm)
CIPHER = dict(zip(LETTERS, _perm, strict=True))


class CharTokenizer:
    """Plain python char <-> id map used by training and evaluation (no dependency, exact round trip)."""

    def __init__(self):
        self.vocab = list(VOCAB)
        self.ids = {c: i for i, c in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id = PAD_ID, BOS_ID, EOS_ID

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        try:
            ids = [self.ids[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the task vocabulary") from None
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int], stop_at_eos: bool = True) -> str:
        out = []
        for i in ids:
            if i == self.eos_id and stop_at_eos:
                break
            if i in (self.pad_id, self.bos_id, self.eos_id):
                continue
            out.append(self.vocab[i])
        return "".join(out)

    def save_hf(self, folder: str | Path) -> None:
        """Write the same vocabulary as a Hugging Face fast tokenizer, so checkpoints look like any HF model."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.WordLevel(vocab=dict(self.ids), unk_token=PAD))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        tok.decoder = decoders.Fuse()
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, self.bos_id)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=PAD)
        fast.save_pretrained(str(folder))


@dataclass(frozen=True)
class Task:
    name: str
    tag: str
    sample: Callable[[random.Random], tuple[str, str]]  # rng -> (input, output)
    description: str
    sibling: Callable[[str], str] = str  # input -> output of the related mapping the base is pretrained on

    def example(self, rng: random.Random, sibling: bool = False) -> tuple[str, str]:
        """(prompt, answer): prompt = TAG input '=', answer = the exact output string (of the sibling
        mapping when `sibling`)."""
        x, y = self.sample(rng)
        return f"{self.tag}{x}{SEP}", (self.sibling(x) if sibling else y)


def _word(rng: random.Random, lo: int = 2, hi: int = 7, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _copy(rng):
    w = _word(rng)
    return w, w


def _reverse(rng):
    w = _word(rng)
    return w, w[::-1]


def _sort(rng):
    w = _word(rng)
    return w, "".join(sorted(w))


def _add(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a}+{b}", str(a + b)


def _count(rng):
    w = _word(rng, 4, 9, "abc")
    return w, str(w.count("a"))


def _successor(rng):
    n = rng.randint(0, 999)
    return str(n), str(n + 1)


def _map(rng):
    w = _word(rng)
    return w, "".join(CIPHER[c] for c in w)


def _rotate(rng):
    w = _word(rng)
    return w, w[1:] + w[0]


def _plus(x: str, d: int) -> str:
    a, _, b = x.partition("+")
    return str(int(a) + (int(b) if b else 0) + d)


# siblings: the letter tasks copy -> reverse -> map -> rotate -> copy are a cycle (pairs that rarely agree),
# sort -> descending sort, add -> a+b+1, count -> word length, successor -> n+2
TASKS: list[Task] = [
    Task("copy", "C", _copy, "repeat a 2-7 letter word", lambda x: x[::-1]),
    Task("reverse", "R", _reverse, "reverse a 2-7 letter word", lambda x: "".join(CIPHER[c] for c in x)),
    Task("sort", "S", _sort, "sort the letters of a 2-7 letter word", lambda x: "".join(sorted(x, reverse=True))),
    Task("add", "A", _add, "sum of two numbers 0-99", lambda x: _plus(x, 1)),
    Task("count", "N", _count, "number of a's in a 4-9 letter a/b/c word", lambda x: str(len(x))),
    Task("successor", "U", _successor, "n+1 for n in 0-999", lambda x: _plus(x, 2)),
    Task("map", "M", _map, "apply a fixed letter substitution cipher", lambda x: x[1:] + x[0]),
    Task("rotate", "T", _rotate, "move the first letter of a 2-7 letter word to the end", lambda x: x),
]
TASK_NAMES = [t.name for t in TASKS]
MAX_ANSWER = 8  # longest answer in characters (sort/copy/reverse/map: 7, add: 3, successor: 4)


def get_task(name: str) -> Task:
    for t in TASKS:
        if t.name == name:
            return t
    raise ValueError(f"unknown task {name!r}; known: {', '.join(TASK_NAMES)}")


def _rng(task: str, stream: str, seed: int) -> random.Random:
    return random.Random(f"{seed}/{TASK_NAMES.index(task)}/{stream}")


def eval_sets(task: str, n_test: int, n_val: int, seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(test, val): distinct (prompt, answer) pairs drawn from one seeded stream and dealt out in
    proportion (not test first), so that both splits have the same mix, e.g. of short and long inputs."""
    t = get_task(task)
    rng = _rng(task, "eval", seed)
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    tries = 0
    while len(out) < n_test + n_val:
        p, a = t.example(rng)
        tries += 1
        if p in seen and tries < 100 * (n_test + n_val):
            continue
        seen.add(p)
        out.append((p, a))
    n = n_test + n_val
    is_val = [(i + 1) * n_val // n > i * n_val // n for i in range(n)]
    return [x for x, v in zip(out, is_val, strict=True) if not v], [x for x, v in zip(out, is_val, strict=True) if v]


def sample_prompts(
    task: str, stream: str, n: int, seed: int = 0, exclude: set[str] | None = None
) -> list[tuple[str, str]]:
    """n (prompt, answer) pairs from a named stream ('train', 'unlabeled', ...), skipping `exclude` prompts."""
    t = get_task(task)
    rng = _rng(task, stream, seed)
    out = []
    while len(out) < n:
        p, a = t.example(rng)
        if exclude and p in exclude:
            continue
        out.append((p, a))
    return out


class TrainStream:
    """Endless seeded (prompt, answer) pairs of one task, never one of the held-out evaluation prompts."""

    def __init__(self, task: str, seed: int, exclude: set[str], sibling: bool = False):
        self.task = get_task(task)
        self.rng = _rng(task, "train", seed)
        self.exclude = exclude
        self.sibling = sibling

    def next(self) -> tuple[str, str]:
        while True:
            p, a = self.task.example(self.rng, self.sibling)
            if p not in self.exclude:
                return p, a
