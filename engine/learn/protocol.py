"""What the one DivMerge learner (blockmerge.learn.learner) needs from a merged model

    theta(Gamma) = theta_0 + sum_t Gamma[t, block] delta_t          (T task models, blocks of the base)

that is streamed block by block. Two implementations: full task vectors delta_t = theta_t - theta_0
(blockmerge.learn.full.StreamedMerge) and LoRA factors delta_t = s_t B_t A_t
(blockmerge.lora.learn.StreamedLoraMerge). Batching, the Adam loop, the teacher pass and its cache, the
output commit and the `divmerge` flow are the learner's; the maths of one step, the teachers and the
output format are the implementation's."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import ClassVar, Protocol

import torch
from blockmerge.io.checkpoint import Block, Checkpoint
from blockmerge.learn.guard import open_checked
from blockmerge.learn.model import StreamedModel
from blockmerge.learn.teacher import TeacherRun, TeacherSpec


class StreamedMergedModel(Protocol):
    command: ClassVar[str]  # the CLI command ('divmerge', 'lora divmerge'): progress bars and messages
    entries: ClassVar[tuple[str, str]]  # the YAML's list of task models and its folder field: ('models', 'model')
    noun: ClassVar[str]  # one task model, in messages: 'expert', 'adapter'
    settings_type: ClassVar[type]  # the LearnSettings subclass of the Python API
    config_type: ClassVar[type]  # the YAML's schema: settings_type + base_model + entries

    T: int  # number of tasks (task models)
    blocks: list[Block]  # the base's blocks: embed, layers.{i}, head
    block_names: list[str]
    model: StreamedModel  # the base's streamed skeleton (its config: vocabulary size)

    @classmethod
    def open(cls, base_dir: Path, dirs: Sequence[Path], settings, budget: int) -> StreamedMergedModel:
        """The merged model of a base and T task-model folders; `budget`: bytes of blocks kept resident."""
        ...

    def loss_and_grad(
        self, gamma: torch.Tensor, batch, objective: str = "js", backward: bool = True
    ) -> tuple[float, torch.Tensor | None]:
        """Loss of `batch` (blockmerge.learn.learner.Batch) at coefficients gamma [T, n_blocks] and, with
        `backward`, dL/dGamma [T, n_blocks]."""
        ...

    # one block at a time: what a pipeline stage of a torch.distributed job runs (blockmerge.learn.pipeline)
    def learns(self, b: int) -> bool:
        """Whether block b's coefficients have a gradient (nothing below the lowest such block is backpropagated)."""
        ...

    def block_weights(self, block: Block, tensors, coeffs: torch.Tensor, rows, grad_col: torch.Tensor | None = None):
        """(weights for StreamedModel.block_forward, finish) of one block at coeffs = Gamma[:, b]; with `grad_col`
        [T], its coefficient gradient accumulates there during the backward and after finish()."""
        ...

    def head_step(self, tensors, gamma: torch.Tensor, h: torch.Tensor, batch, objective: str, backward: bool,
                  grad: torch.Tensor) -> tuple[float, torch.Tensor | None]:  # fmt: skip
        """The head block on the last hidden states h: loss and dL/dh; the head's (and a tied embedding's)
        coefficient gradients go into grad [T, n_blocks]."""
        ...

    def teacher_key(self, t: int) -> tuple[str, list]:
        """Task t's teacher: a folder-name prefix and what its outputs depend on besides the prompts and
        the TeacherSpec (files, fingerprints, settings), hashed into the cache key."""
        ...

    def teachers(self, tasks: Sequence[int], spec: TeacherSpec) -> Iterator[TeacherRun]:
        """The streamed forward of the teachers of `tasks`: one TeacherRun per model pass (a run may serve
        several tasks, picking each row's teacher with `select`)."""
        ...

    @staticmethod
    def write(
        base_dir: Path, dirs: Sequence[Path], coefficients: torch.Tensor, out: Path, settings, *,
        force: bool, progress: bool, info: dict,
    ) -> Path:  # fmt: skip
        """Write the merged model at `coefficients` [T, n_blocks] to OUT (the run has claimed it), with
        `info` (divmerge.json) beside it."""
        ...


class StreamedBase:
    """What the two implementations share: the base checkpoint and its streamed skeleton on `device`, the
    compute dtype, the head's chunk of positions, and `open` from the settings."""

    def __init__(
        self,
        base_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
        token_chunk: int | None = None,
    ):
        self.base = Checkpoint(base_dir)
        self.device = torch.device(device)
        self.dtype = dtype
        # refuses an architecture whose streamed forward is not transformers' own (before any work)
        self.model = open_checked(self.base, attn_implementation=attn_implementation, device=self.device)
        self.token_chunk = token_chunk
        self.blocks = self.model.blocks
        self.block_names = self.model.block_names

    @classmethod
    def open(cls, base_dir: Path, dirs: Sequence[Path], settings, budget: int, **more):
        """The merged model of `settings` (a LearnSettings) with `budget` bytes of resident blocks."""
        return cls(base_dir, dirs, device=settings.device, dtype=getattr(torch, settings.compute_dtype),
                   attn_implementation=settings.attn_implementation, token_chunk=settings.token_chunk,
                   resident_max_bytes=budget, **more)  # fmt: skip
