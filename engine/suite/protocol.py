"""The evaluation protocol every task suite implements: the built-in synthetic suite and a suite of a real
pretrained LLM alike. `Comparison`, `benchmarks/quality*.py` and `blockmerge demo` take any `TaskSuite`.

A suite is a base model, one expert (a full checkpoint) per task, a way to turn a prompt string into token
ids and generated ids back into an answer string, and per task: labeled test and validation pairs (exact
answers) and unlabeled prompts for the learned merges (DivMerge, AdaMerging)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class TaskSuite(Protocol):
    name: str  # shown in tables and file names
    tasks: tuple[str, ...]
    base: Path  # Hugging Face checkpoint folder of the base model
    eos_token_id: int  # generation stops here (not part of the answer)
    pad_token_id: int

    def expert(self, task: str) -> Path:
        """Checkpoint folder of the expert fine-tuned on `task`."""
        ...

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids the model sees before its answer (BOS, chat template, ... as the suite poses tasks).
        Raises ValueError naming the character or token that cannot be encoded."""
        ...

    def decode_answer(self, ids: Sequence[int]) -> str:
        """The answer string of generated ids (EOS already removed), normalised as the suite compares them."""
        ...

    def max_new_tokens(self, task: str) -> int:
        """Greedy-decoding budget for `task`'s answers (longest answer + EOS)."""
        ...

    def pairs(self, task: str, split: str) -> list[tuple[str, str]]:
        """(prompt, answer) pairs of `split` in {'test', 'val'}."""
        ...

    def unlabeled(self, task: str, n: int) -> list[str]:
        """n prompts of `task` disjoint from its test and validation prompts (inputs of learned merges)."""
        ...
