"""Synthetic text tasks with exact answers, and the character-level tokenizer they share.

Prompt format (exactly; no spaces, one token per character):

    token ids = [BOS] + chars(TAG + input + "=")      the prompt, e.g. "Cabz=" for shift("abz")
    answer    = chars(output) + [EOS]                 e.g. "bca" then EOS

TAG is one upper-case letter naming the task or skill. BOS (`<s>`), EOS (`</s>`) and PAD (`<pad>`) are
special tokens, never characters: `encode` of a string holding `<`, a space or any character outside the
vocabulary raises ValueError naming it. Completion-only training puts the loss on the answer; evaluation
greedily decodes after `=` and counts exact matches of the output string.

Two families share the format:
- GENERIC skills (shift, reverse, add, copy, ... and more) under their own tags: the base model is
  pretrained on all of them, so it knows the format and the computations;
- TASKS, the same kinds of computation under tags (CRSKNUMT) that the base never sees: the base scores ~0
  on them, and each expert learns its task with a short fine-tune (a small task vector), as when a
  broadly pretrained model is fine-tuned to follow a new instruction.
Under a tag it never saw, the base falls back on some generic behaviour, most often copying the input; so
copying is a generic skill but no task, and no task's answer is ever its input (inputs a task would leave
unchanged, a palindrome to reverse, are not drawn). The base is also pretrained on prompts under tags it
does not know (UnknownTagStream), answered by nothing: under a task's tag it answers nothing rather than
whatever skill the random row of an unseen tag happens to evoke, so it scores 0 on the tasks by
construction, on any CPU kind, not by chance.
Generators are pure functions of a seed, so every split is reproducible."""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIALS = [PAD, BOS, EOS]
SEP = "="
TAGS = "CRSKNUMT"  # one per task, see TASKS; never in the base's pretraining
UNKNOWN_TAG = "Z"  # stands for a tag the model does not know: training embeds it as a random vector
CHARS = list(string.digits) + list(string.ascii_lowercase) + list(string.ascii_uppercase) + [SEP, "+"]
VOCAB = SPECIALS + CHARS  # 3 + 10 + 26 + 26 + 2 = 67 tokens
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
        self.eos_token_id = EOS_ID

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = []
        for i, c in enumerate(text):
            if c not in self.ids:
                raise ValueError(
                    f"character {c!r} at position {i} of {text!r} is not in the task vocabulary "
                    "(digits, letters, '=', '+'; BOS/EOS are added by the tokenizer, never typed)"
                )
            ids.append(self.ids[c])
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int], stop_at_eos: bool = True) -> str:
        out = []
        for i in ids:
            if i == self.eos_id and stop_at_eos:
                break
            if i in (self.pad_id, self.bos_id, self.eos_id):
                continue
            out.append(self.vocab[i])
        return "".join(out)

    def encode_prompt(self, prompt: str) -> list[int]:
        return self.encode(prompt, bos=True)

    def decode_answer(self, ids: Sequence[int]) -> str:
        return self.decode(ids)

    def save_hf(self, folder: str | Path) -> None:
        """Write the same vocabulary as a Hugging Face fast tokenizer, so checkpoints look like any HF model.
        (It maps unknown characters to <pad>; `encode` above is the strict one.)"""
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
    max_answer: int  # longest output in characters

    def example(self, rng: random.Random) -> tuple[str, str]:
        """(prompt, answer): prompt = TAG input '=', answer = the exact output string."""
        x, y = self.sample(rng)
        return f"{self.tag}{x}{SEP}", y


def _word(rng: random.Random, lo: int = 2, hi: int = 7, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _on_word(f: Callable[[str], str], lo: int = 2, hi: int = 7, alphabet: str = LETTERS, changes: bool = True):
    """Sampler of (word, f(word)). With `changes`, a word that f leaves as it is (a palindrome to reverse)
    is drawn again: copying the input never answers a task."""

    def sample(rng):
        w = _word(rng, lo, hi, alphabet)
        while changes and f(w) == w:
            w = _word(rng, lo, hi, alphabet)
        return w, f(w)

    return sample


def _on_pair(f: Callable[[int, int], int], hi: int = 19):
    def sample(rng):
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        return f"{a}+{b}", str(f(a, b))

    return sample


def _on_number(f: Callable[[int], int], lo: int = 0):
    def sample(rng):
        n = rng.randint(lo, 999)
        return str(n), str(f(n))

    return sample


def _cipher(w: str) -> str:
    return "".join(CIPHER[c] for c in w)


def _shift(w: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in w)


TASKS: list[Task] = [
    Task("shift", "C", _on_word(_shift), "replace each letter of a 2-7 letter word by the next one (z by a)", 7),
    Task("reverse", "R", _on_word(lambda w: w[::-1]), "reverse a 2-7 letter word", 7),
    Task("tail", "S", _on_word(lambda w: w[1:]), "a 2-7 letter word without its first letter", 6),
    Task("last", "K", _on_word(lambda w: w[-1]), "the last letter of a 2-7 letter word", 1),
    Task(
        "count", "N", _on_word(lambda w: str(w.count("a")), 4, 9, "abc"), "count the a's of a 4-9 letter a/b/c word", 1
    ),
    Task("successor", "U", _on_number(lambda n: n + 1), "n+1 for n in 0-999", 4),
    Task("map", "M", _on_word(_cipher), "apply a fixed letter substitution cipher", 7),
    Task("rotate", "T", _on_word(lambda w: w[1:] + w[0]), "move the first letter of a 2-7 letter word to the end", 7),
]
TASK_NAMES = [t.name for t in TASKS]
# The base's pretraining: every task's computation under another tag, plus related skills (the broad
# pretraining of a real base). The tasks' own tags never appear in it.
GENERIC: list[Task] = [
    Task("g_shift", "B", TASKS[0].sample, "next letter", 7),
    Task("g_reverse", "D", TASKS[1].sample, "reverse", 7),
    Task("g_tail", "E", TASKS[2].sample, "tail", 6),
    Task("g_last", "X", TASKS[3].sample, "last letter", 1),
    Task("g_count", "G", TASKS[4].sample, "count a", 1),
    Task("g_successor", "H", TASKS[5].sample, "n+1", 4),
    Task("g_map", "I", TASKS[6].sample, "cipher", 7),
    Task("g_rotate", "J", TASKS[7].sample, "rotate left", 7),
    Task("g_length", "L", _on_word(lambda w: str(len(w))), "word length", 1),
    Task("g_predecessor", "O", _on_number(lambda n: n - 1, 1), "n-1", 3),
    Task("g_rotate_right", "P", _on_word(lambda w: w[-1] + w[:-1]), "rotate right", 7),
    Task("g_count_b", "Q", _on_word(lambda w: str(w.count("b")), 4, 9, "abc"), "count b", 1),
    Task("g_add", "F", _on_pair(lambda a, b: a + b), "a+b", 2),
    Task("g_add1", "V", _on_pair(lambda a, b: a + b + 1), "a+b+1", 2),
    Task("g_first", "W", _on_word(lambda w: w[0]), "first letter", 1),
    Task("g_copy", "Y", _on_word(lambda w: w, changes=False), "copy", 7),
]
MAX_ANSWER = max(t.max_answer for t in TASKS + GENERIC)
assert not set(TAGS + UNKNOWN_TAG) & {g.tag for g in GENERIC} and UNKNOWN_TAG not in TAGS


def get_task(name: str) -> Task:
    for t in TASKS + GENERIC:
        if t.name == name:
            return t
    raise ValueError(f"unknown task {name!r}; known: {', '.join(TASK_NAMES)}")


def _rng(task: str, stream: str, seed: int) -> random.Random:
    return random.Random(f"{seed}/{task}/{stream}")


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
    """Endless seeded (prompt, answer) pairs of one task or skill, never one of the held-out prompts.
    A generic skill excludes the held-out inputs of the task that shares its computation, so no test input
    is ever trained on, under any tag."""

    def __init__(self, task: str, seed: int, exclude: set[str]):
        self.task = get_task(task)
        self.rng = _rng(task, "train", seed)
        self.exclude = {p[1:] for p in exclude}  # inputs, whatever the tag

    def next(self) -> tuple[str, str]:
        while True:
            p, a = self.task.example(self.rng)
            if p[1:] not in self.exclude:
                return p, a


class UnknownTagStream:
    """Inputs of the given generic skills under a tag the model does not know, answered by nothing (EOS
    alone). The tag is written UNKNOWN_TAG and training embeds it as a fresh random vector drawn as an
    unseen token's row is initialised (train.answer_logits), never as its own row: the base learns that an
    instruction it does not know has no answer, which is what it meets under a task's tag."""

    def __init__(self, streams: Sequence[TrainStream], seed: int):
        self.streams = list(streams)
        self.rng = random.Random(f"{seed}/unknown-tag/train")

    def next(self) -> tuple[str, str]:
        prompt, _ = self.streams[self.rng.randrange(len(self.streams))].next()
        return UNKNOWN_TAG + prompt[1:], ""
