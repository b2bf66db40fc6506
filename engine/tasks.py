"""Synthetic text tasks with exact answers, and the character-level tokenizer they share.

Every example is ``<s> TAG input = output </s>`` at the character level, where TAG is one upper-case
letter naming the task. Generators are pure functions of a seed, so every split is reproducible.
Completion-only training puts the loss on ``output </s>`` only; evaluation greedily decodes after ``=``
and counts exact matches of the output string.
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

    def example(self, rng: random.Random) -> tuple[str, str]:
        """(prompt, answer): prompt = TAG input '=', answer = the exact output string."""
        x, y = self.sample(rng)
        return f"{self.tag}{x}{SEP}", y


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
    w = _word(rng, 1, 9, "ab")
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


TASKS: list[Task] = [
    Task("copy", "C", _copy, "repeat a 2-7 letter word"),
    Task("reverse", "R", _reverse, "reverse a 2-7 letter word"),
    Task("sort", "S", _sort, "sort the letters of a 2-7 letter word"),
    Task("add", "A", _add, "sum of two numbers 0-99"),
    Task("count", "N", _count, "number of a's in a 1-9 letter a/b word"),
    Task("successor", "U", _successor, "n+1 for n in 0-999"),
    Task("map", "M", _map, "apply a fixed letter substitution cipher"),
    Task("rotate", "T", _rotate, "move the first letter of a 2-7 letter word to the end"),
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
    """(test, val): distinct (prompt, answer) pairs drawn from one seeded stream, test first."""
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
    return out[:n_test], out[n_test:]


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

    def __init__(self, task: str, seed: int, exclude: set[str]):
        self.task = get_task(task)
        self.rng = _rng(task, "train", seed)
        self.exclude = exclude

    def next(self) -> tuple[str, str]:
        while True:
            p, a = self.task.example(self.rng)
            if p not in self.exclude:
                return p, a
