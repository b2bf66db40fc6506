"""DivMerge (arXiv 2509.02108): learn merge coefficients Gamma so that the merged model

    theta(Gamma) = theta_0 + sum_t Gamma_t tau_t,          tau_t = theta_t - theta_0

stays close to each expert on that expert's own (unlabeled) inputs:

    L(Gamma) = sum_t  mean_{x in task t, i}  JS( p_t(. | x, y<i) || p_Gamma(. | x, y<i) )

where y is expert t's greedy continuation of x. KL(expert || merged) is available as an ablation, and
AdaMerging's objective (entropy of the merged model's predictions, init 0.3, clamped to [0, 1]) as the
baseline, in the same machinery. Gamma is per task ('task' level) or per task and block ('layer' level;
blocks = the embedding block, each decoder layer, and the head block = final norm + lm_head; with tied
embeddings the output projection is the embedding's tensor, so the head's use of it counts towards the
embed block's coefficient).

Blocks of the base and the experts stay resident on the device while they fit in the memory budget
(`memory`, default half of the device's free memory); the others are streamed, one block of every model at
a time (two while the next one is prefetched). When everything is resident and the step's graph fits too,
the step keeps its autograd graph: each block's merged weights are built once and nothing is recomputed
(`StreamedMerge.graph_fits`). Otherwise a learning step is

  forward   for each block: W = combine(base, experts, Gamma[:, b]) per tensor; run the block without
            grad; keep the block's input activation on the host.
  head      final norm + lm_head + log_softmax + divergence, only at the target positions, in chunks of
            positions, each chunk backpropagated at once: d loss / d h_L and d loss / d W_head.
  backward  blocks in reverse: rebuild W as leaves requiring grad, recompute the block from its stored
            input, backward the incoming gradient, read d h_in and d W; d L / d Gamma[t, b] =
            sum over the block's tensors of project(dW, base, experts)[t] = <dW, tau_t>.

The entropy objective is evaluated at the same positions as JS (those predicting expert t's continuation
of each prompt), averaged per task and summed over tasks as in AdaMerging."""

from __future__ import annotations

import json
import math
import numbers
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml
from blockmerge.io.cache import teacher_cache
from blockmerge.io.checkpoint import Checkpoint, block_name, check_compatible
from blockmerge.io.commit import claim_output
from blockmerge.io.stream import BlockSource, memory_budget, parse_memory
from blockmerge.kernels import combine, project
from blockmerge.learn.losses import OBJECTIVES, Targets, chunked_head_loss
from blockmerge.learn.model import StreamedModel
from blockmerge.learn.teacher import TeacherData, TeacherSpec, teacher_pass
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

LEVELS = ("task", "layer")
SMALL_MODEL_BYTES = 64 << 20
LOGITS_CHUNK_BYTES = 32 << 20


@dataclass
class LearnResult:
    coefficients: torch.Tensor  # fp32 [T, n_blocks]
    block_names: list[str]
    losses: list[float]  # loss of each step's batch, at the coefficients before that step's update
    objective: str = "js"
    level: str = "layer"
    config: dict = field(default_factory=dict)
    seconds_per_step: float = 0.0

    def to_json(self) -> dict:
        return {
            "objective": self.objective,
            "level": self.level,
            "block_names": self.block_names,
            "coefficients": [
                {name: float(self.coefficients[t, b]) for b, name in enumerate(self.block_names)}
                for t in range(self.coefficients.shape[0])
            ],
            "losses": self.losses,
            "seconds_per_step": self.seconds_per_step,
            "config": self.config,
        }


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, S], right-padded
    rows: torch.Tensor  # [N] batch index of each target position
    cols: torch.Tensor  # [N] sequence position whose output predicts the target
    weights: torch.Tensor  # [N] 1 / (number of target positions of that row's task in the batch)
    targets: Targets | None  # teacher distributions at the N positions (None for the entropy objective)
    tasks: torch.Tensor  # [N] task of each position


def make_batch(items: Sequence[tuple[int, int]], data: TeacherData, pad_id: int = 0) -> Batch:
    """Teacher-forced inputs prompt + continuation[:-1]; the position P-1+i predicts continuation[i]."""
    seqs, rows, cols, tasks, tparts = [], [], [], [], []
    for b, (t, j) in enumerate(items):
        tokens, plen, targets = data.get(t, j)
        n = len(tokens) - plen
        seqs.append(tokens[:-1])
        rows += [b] * n
        cols += list(range(plen - 1, plen - 1 + n))
        tasks += [t] * n
        if targets is not None:
            tparts.append(targets)
    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), pad_id, dtype=torch.int64)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = s
    tasks_t = torch.tensor(tasks)
    counts = torch.bincount(tasks_t)
    weights = 1.0 / counts[tasks_t].double()
    return Batch(ids, torch.tensor(rows), torch.tensor(cols), weights, Targets.cat(tparts) if tparts else None, tasks_t)


class StreamedMerge:
    """The merged model theta(Gamma) of a base and experts, streamed block by block: loss and dL/dGamma."""

    def __init__(
        self,
        base_dir: str | Path,
        expert_dirs: Sequence[str | Path],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
        token_chunk: int | None = None,
        resident_max_bytes: int = 0,
    ):
        self.base = Checkpoint(base_dir)
        self.experts = [Checkpoint(e) for e in expert_dirs]
        if not self.experts:
            raise ValueError("divmerge needs at least one expert model")
        check_compatible(self.base, self.experts)
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = StreamedModel(self.base, attn_implementation=attn_implementation, device=self.device)
        self.source = BlockSource([self.base, *self.experts], device=self.device, resident_max_bytes=resident_max_bytes)
        self.budget = resident_max_bytes
        vocab = self.model.config.get_text_config().vocab_size
        # positions per head chunk: default so that one chunk's fp32 logits take ~LOGITS_CHUNK_BYTES
        self.token_chunk = token_chunk or max(16, LOGITS_CHUNK_BYTES // (4 * vocab))
        self.blocks = self.model.blocks
        self.block_names = self.model.block_names
        self.T = len(self.experts)

    def merged(self, tensors, coeffs: Sequence[float], names=None, grad: bool = False) -> dict[str, torch.Tensor]:
        base, experts = tensors[0], tensors[1:]
        out = {}
        for n in names or base:
            w = combine(base[n], [e[n] for e in experts], list(coeffs), out_dtype=self.dtype)
            out[n] = w.requires_grad_(grad)
        return out

    def _project(self, W: dict[str, torch.Tensor], tensors, grad_col: torch.Tensor) -> None:
        for n, w in W.items():
            if w.grad is not None:
                grad_col += project(w.grad, tensors[0][n], [e[n] for e in tensors[1:]]).to(grad_col)

    def _merged_projecting(self, tensors, coeffs, grad_col: torch.Tensor) -> dict[str, torch.Tensor]:
        """Merged leaves whose gradient is projected onto the task vectors as soon as autograd has it,
        then dropped (with the leaf itself): a block's dW never exist all at once."""
        W = self.merged(tensors, coeffs, grad=True)

        def make(n):
            def hook(p):
                grad_col.add_(project(p.grad, tensors[0][n], [e[n] for e in tensors[1:]]).to(grad_col))
                p.grad = None
                W.pop(n, None)

            return hook

        for n, w in W.items():
            w.register_post_accumulate_grad_hook(make(n))
        return W

    def _embed_rows(self, tensors, rows: torch.Tensor):
        """The embed block with only the batch's rows of the token embedding (a [U, H] slice per model):
        the lookup and its gradient touch nothing else, so neither the merged table nor its dense
        gradient is ever built."""
        name = self.model.tokens_weight_name
        return [dict(t, **{name: t[name][rows]}) for t in tensors]

    def graph_fits(self, batch: Batch) -> bool:
        """Whether one step can keep its whole autograd graph: every block resident, and the merged weights
        (one model in the compute dtype) plus a generous estimate of the saved activations fit in what the
        memory budget leaves."""
        if not self.source.resident:
            return False
        cfg = self.model.config.get_text_config()
        inter = getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size
        heads = getattr(cfg, "num_attention_heads", 1)
        per_token = self.model.num_layers * (16 * cfg.hidden_size + 4 * inter + 2 * heads * batch.input_ids.shape[1])
        acts = batch.input_ids.numel() * per_token * self.dtype.itemsize
        merged = sum(t.nbytes // t.dtype.itemsize for t in self.base.tensors.values()) * self.dtype.itemsize
        return self.source.resident_bytes + merged + acts <= self.budget

    def loss_and_grad(
        self, gamma: torch.Tensor, batch: Batch, objective: str = "js", backward: bool = True
    ) -> tuple[float, torch.Tensor | None]:
        """Loss of `batch` at coefficients gamma [T, n_blocks] and, with `backward`, dL/dGamma [T, n_blocks].
        When the models and the step's graph fit in the memory budget (`graph_fits`), the forward keeps its
        graph and the backward runs once through it; otherwise blocks are streamed and each block is
        recomputed in the backward pass."""
        if objective not in OBJECTIVES:
            raise ValueError(f"objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")
        if objective != "entropy" and batch.targets is None:
            raise ValueError(f"objective {objective!r} needs teacher distributions")
        gamma = gamma.detach().float().cpu()
        if self.graph_fits(batch):
            return self._loss_and_grad_in_memory(gamma, batch, objective, backward)
        m, dev = self.model, self.device
        ids = batch.input_ids.to(dev)
        pos = torch.arange(ids.shape[1], device=dev)[None]
        grad = torch.zeros(self.T, len(self.blocks), dtype=torch.float64, device=dev)  # no sync per tensor
        rows = m.token_rows(ids)
        acts: list[torch.Tensor] = []  # acts[l] = input of decoder layer l; acts[L] = input of the head
        h = pe = masks = None
        loss = 0.0
        for block, tensors in self.source.stream(self.blocks):
            b = m.block_index[block.name]
            if block.name != "head":
                with torch.no_grad():
                    if block.name == "embed":
                        tensors = self._embed_rows(tensors, rows)
                    W = self.merged(tensors, gamma[:, b].tolist())
                    h, pe, masks = self._block_forward(block, W, ids, pos, rows, h, pe, masks)
                    acts.append(h.to("cpu", copy=dev.type != "cpu"))
                del W
                continue
            # head: loss at the target positions, in chunks, with gradients for h_L and the head weights
            loss, dh = self._head(tensors, gamma, h, batch, objective, backward, grad)
            if not backward:
                return loss, None
            del h, tensors  # before the backward stream starts reading
        # backward through the decoder layers and the embedding, recomputing each block
        for block, tensors in self.source.stream(list(reversed(self.blocks[:-1]))):
            b = m.block_index[block.name]
            if block.name == "embed":
                tensors = self._embed_rows(tensors, rows)
            W = self._merged_projecting(tensors, gamma[:, b].tolist(), grad[:, b])
            if block.name == "embed":
                out = m.embed(W, ids, pos, rows)
                out.backward(dh)
            else:
                h_in = acts[block.layer].to(dev).requires_grad_(True)
                out = m.layer(block.layer, W, h_in, position_ids=pos, position_embeddings=pe, masks=masks)
                out.backward(dh)
                dh = h_in.grad
                acts[block.layer + 1] = None
            self._project(W, tensors, grad[:, b])  # leaves the hooks did not see (none in practice)
            del W, out, tensors
        return loss, grad.float().cpu()

    def _block_forward(self, block, W, ids, pos, rows, h, pe, masks):
        """The embedding block (which also sets the position embeddings and masks) or one decoder layer."""
        m = self.model
        if block.name == "embed":
            h = m.embed(W, ids, pos, rows)
            return h, m.position_embeddings(h, pos), m.masks(h, pos)
        return m.layer(block.layer, W, h, position_ids=pos, position_embeddings=pe, masks=masks), pe, masks

    def _head(self, tensors, gamma, h, batch: Batch, objective: str, backward: bool, grad: torch.Tensor):
        """Final norm + lm_head + divergence at the target positions of h (in chunks). With `backward`, the head's
        (and the tied embedding's) coefficient gradients go into `grad`, and dL/dh is returned beside the loss."""
        m, dev = self.model, self.device
        b = m.block_index["head"]
        W = self.merged(tensors, gamma[:, b].tolist(), grad=backward)
        emb_tensors, E = None, None
        if m.tied:
            emb_tensors = self.source.read(m.embed_block())
            E = self.merged(
                emb_tensors, gamma[:, m.block_index["embed"]].tolist(), names=[m.tokens_weight_name], grad=backward
            )
        rows, cols = batch.rows.to(dev), batch.cols.to(dev)
        hsel = h[rows, cols].detach().requires_grad_(backward)
        head_w = E[m.tokens_weight_name] if m.tied else W[m.head_weight_name]
        norm = lambda x, W=W: m.final_norm(W, x)
        loss = chunked_head_loss(
            hsel, batch.weights, batch.targets, objective, norm, head_w, W.get(m.head_bias_name), self.token_chunk,
            backward,
        )  # fmt: skip
        if not backward:
            return loss, None
        self._project(W, tensors, grad[:, b])
        if m.tied:
            self._project(E, emb_tensors, grad[:, m.block_index["embed"]])
        dh = torch.zeros_like(h)
        dh.index_put_((rows, cols), hsel.grad, accumulate=True)
        return loss, dh

    def _loss_and_grad_in_memory(self, gamma, batch: Batch, objective: str, backward: bool):
        """The step with every block resident and the whole graph kept: each block's merged weights are built
        once (leaves projected onto the task vectors by their hooks), no block is recomputed."""
        m, dev = self.model, self.device
        ids = batch.input_ids.to(dev)
        pos = torch.arange(ids.shape[1], device=dev)[None]
        grad = torch.zeros(self.T, len(self.blocks), dtype=torch.float64, device=dev)  # no sync per tensor
        rows = m.token_rows(ids)
        h = pe = masks = None
        with torch.set_grad_enabled(backward):
            for block, tensors in self.source.stream(self.blocks[:-1]):
                b = m.block_index[block.name]
                if block.name == "embed":
                    tensors = self._embed_rows(tensors, rows)
                coeffs = gamma[:, b].tolist()
                W = self._merged_projecting(tensors, coeffs, grad[:, b]) if backward else self.merged(tensors, coeffs)
                h, pe, masks = self._block_forward(block, W, ids, pos, rows, h, pe, masks)
                del W
        loss, dh = self._head(self.source.read(m.head_block()), gamma, h, batch, objective, backward, grad)
        if not backward:
            return loss, None
        h.backward(dh)  # the hooks project each block's weight gradients as autograd produces them
        return loss, grad.float().cpu()


def batches(counts: Sequence[int], batch_size: int, seed: int):
    """Endless batches of (task, sequence) pairs mixing tasks, reshuffled each epoch from `seed`."""
    pairs = [(t, j) for t, n in enumerate(counts) for j in range(n)]
    rng = random.Random(seed)
    while True:
        rng.shuffle(pairs)
        for s in range(0, len(pairs), batch_size):
            yield pairs[s : s + batch_size]


def teacher_folders(
    base_dir,
    expert_dirs,
    inputs,
    cache_dir: Path,
    spec: TeacherSpec,
    *,
    device="cpu",
    progress=True,
    attn_implementation="sdpa",
    resident_max_bytes: int = 1 << 29,
) -> list[Path]:
    from blockmerge.io.report import progress as bar

    folders = []
    total = sum(len(x) for x in inputs)
    with bar(total, "teacher", unit="seq", disable=not progress) as pbar:
        for e, prompts in zip(expert_dirs, inputs, strict=True):
            folders.append(
                teacher_pass(
                    e,
                    [list(map(int, p)) for p in prompts],
                    cache_dir,
                    spec,
                    device=device,
                    attn_implementation=attn_implementation,
                    resident_max_bytes=resident_max_bytes,
                    progress=pbar,
                )
            )
    return folders


def learn(
    base_dir: str | Path,
    expert_dirs: Sequence[str | Path],
    inputs: Sequence[Sequence[Sequence[int]]],
    *,
    level: Literal["task", "layer"] = "layer",
    objective: Literal["js", "kl", "entropy"] = "js",
    steps: int | None = 100,
    epochs: float | None = None,
    lr: float = 1e-2,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    eos_token_id: int | None = None,
    init: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    progress: bool = True,
    topk: int = 64,
    full_vocab_max: int = 4096,
    token_chunk: int | None = None,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    resident_max_bytes: int | None = None,
    num_threads: int | None = None,
    memory: int | str | None = None,
) -> LearnResult:
    """Learn merge coefficients. `inputs[t]` are task t's prompts (lists of token ids, no padding).

    Returns coefficients [T, n_blocks] (task level: the same value in every block of a task).
    `memory`: bytes (or '8GiB', '512MiB') of base and expert blocks kept resident on `device` while
    learning (and of the expert's blocks during its teacher pass); blocks beyond it are streamed from disk.
    Default: half of the device's free memory. `resident_max_bytes`: the same budget in bytes (older name).
    `cache_dir`: teacher passes, reused across runs; default `<blockmerge cache>/teacher`.
    `num_threads`: torch intra-op threads while learning (restored after); default: 1 for models under
    SMALL_MODEL_BYTES, whose ops are too small to gain from threads (and lose badly on a busy CPU),
    else unchanged."""
    if num_threads is None and Checkpoint(base_dir).nbytes < SMALL_MODEL_BYTES:
        num_threads = 1
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _learn(**{k: v for k, v in locals().items() if k not in ("previous", "num_threads")})
    finally:
        torch.set_num_threads(previous)


def _learn(
    base_dir,
    expert_dirs,
    inputs,
    *,
    level,
    objective,
    steps,
    epochs,
    lr,
    batch_size,
    max_new_tokens,
    eos_token_id,
    init,
    seed,
    device,
    cache_dir,
    progress,
    topk,
    full_vocab_max,
    token_chunk,
    dtype,
    attn_implementation,
    resident_max_bytes,
    memory,
) -> LearnResult:
    if level not in LEVELS:
        raise ValueError(f"level {level!r}: expected one of {', '.join(LEVELS)}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")
    expert_dirs = [Path(e) for e in expert_dirs]
    if len(inputs) != len(expert_dirs):
        raise ValueError(f"inputs: {len(inputs)} prompt lists for {len(expert_dirs)} experts")
    for t, x in enumerate(inputs):
        if not x:
            raise ValueError(f"inputs[{t}]: no prompts for expert {expert_dirs[t]}")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    check_learning(steps, epochs, lr, init)
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"dtype {dtype!r}: expected float32, float64 or bfloat16")
    budget = memory_budget(memory if resident_max_bytes is None else resident_max_bytes, device)
    config = dict(
        level=level,
        objective=objective,
        steps=steps,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        init=init,
        seed=seed,
        device=device,
        topk=topk,
        full_vocab_max=full_vocab_max,
        token_chunk=token_chunk,
        dtype=dtype,
    )
    merge = StreamedMerge(
        base_dir,
        expert_dirs,
        device=device,
        dtype=torch_dtype,
        attn_implementation=attn_implementation,
        token_chunk=token_chunk,
        resident_max_bytes=budget,
    )
    check_prompts(inputs, merge.model.config.get_text_config().vocab_size, expert_dirs)
    spec = TeacherSpec(
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        full_vocab_max=full_vocab_max,
        topk=topk,
        store_dists=objective != "entropy",
    )
    folders = teacher_folders(
        base_dir,
        expert_dirs,
        inputs,
        Path(cache_dir) if cache_dir is not None else teacher_cache(),
        spec,
        device=device,
        progress=progress,
        attn_implementation=attn_implementation,
        resident_max_bytes=budget,
    )
    data = TeacherData(folders)
    return optimize(merge, data, level=level, objective=objective, steps=steps, epochs=epochs, lr=lr,
                    batch_size=batch_size, init=init, seed=seed, progress=progress, config=config,
                    desc=f"divmerge {objective}/{level}")  # fmt: skip


def check_learning(steps: int | None, epochs: float | None, lr: float, init: float | None) -> None:
    """The optimiser's numbers, before any work: steps >= 1 (or epochs > 0), lr > 0, all finite."""
    if steps is not None and (type(steps) is not int or steps < 1):
        raise ValueError(f"steps: {steps!r}, expected an integer >= 1")
    if epochs is not None and not (math.isfinite(epochs) and epochs > 0):
        raise ValueError(f"epochs: {epochs!r}, expected a finite number > 0")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr: {lr!r}, expected a finite number > 0")
    if init is not None and not math.isfinite(init):
        raise ValueError(f"init: {init!r}, expected a finite number")


def optimize(merge, data: TeacherData, *, level: str, objective: str, steps: int | None, epochs: float | None,
             lr: float, batch_size: int, init: float | None, seed: int, progress: bool, config: dict,
             desc: str) -> LearnResult:  # fmt: skip
    """Adam on Gamma over batches mixing tasks; `merge.loss_and_grad(gamma [T, blocks], batch, objective)` gives
    the loss and its streamed gradient (full models or LoRA adapters alike)."""
    from blockmerge.io.report import progress as bar

    check_learning(steps, epochs, lr, init)
    T, nb = merge.T, len(merge.blocks)
    counts = [data.n_seqs(t) for t in range(T)]
    if steps is None:
        if epochs is None:
            raise ValueError("give steps or epochs")
        steps = max(1, math.ceil(epochs * sum(counts) / batch_size))
    if init is None:
        init = 0.3 if objective == "entropy" else 1.0 / T
    gamma = torch.full((T, nb) if level == "layer" else (T,), float(init), dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([gamma], lr=lr)
    losses: list[float] = []
    stream = batches(counts, batch_size, seed)
    started = time.perf_counter()
    with bar(steps, desc, unit="step", disable=not progress) as pbar:
        for _ in range(steps):
            batch = make_batch(next(stream), data)
            full = gamma.detach() if level == "layer" else gamma.detach()[:, None].expand(T, nb)
            loss, g = merge.loss_and_grad(full, batch, objective)
            opt.zero_grad()
            gamma.grad = g if level == "layer" else g.sum(1)
            opt.step()
            if objective == "entropy":  # AdaMerging keeps coefficients in [0, 1]
                with torch.no_grad():
                    gamma.clamp_(0.0, 1.0)
            losses.append(loss)
            pbar.set_postfix(loss=f"{loss:.4f}")
            pbar.update(1)
    elapsed = time.perf_counter() - started
    coeffs = gamma.detach().clone() if level == "layer" else gamma.detach()[:, None].expand(T, nb).clone()
    return LearnResult(coeffs, list(merge.block_names), losses, objective, level, config, elapsed / max(steps, 1))


def write_merged(
    base_dir: str | Path,
    expert_dirs: Sequence[str | Path],
    coefficients: torch.Tensor,
    out: str | Path,
    *,
    force: bool = False,
    dtype: torch.dtype | str | None = None,
    device=None,
    progress: bool = True,
    extra_json: dict | None = None,
) -> Path:
    """Write theta_0 + sum_t Gamma[t, block(tensor)] tau_t as a checkpoint (coefficients [T, n_blocks]
    in the base checkpoint's block order, or [T] for task level)."""
    from blockmerge.merge.run import stream_merge

    base = Checkpoint(base_dir)
    experts = [Checkpoint(e) for e in expert_dirs]
    names = [b.name for b in base.blocks()]
    index = {n: i for i, n in enumerate(names)}
    coeffs = torch.as_tensor(coefficients, dtype=torch.float32).detach().cpu()
    if coeffs.dim() == 1:
        coeffs = coeffs[:, None].expand(len(experts), len(names))
    if tuple(coeffs.shape) != (len(experts), len(names)):
        raise ValueError(
            f"coefficients: shape {list(coeffs.shape)}, expected [{len(experts)}, {len(names)}] "
            f"(experts x blocks {names})"
        )
    from blockmerge.io.dtypes import parse_dtype

    dtype = parse_dtype(dtype)

    def merge_tensor(name: str, b: torch.Tensor, es: list[torch.Tensor]) -> torch.Tensor:
        if not b.is_floating_point():
            return b
        return combine(b, es, coeffs[:, index[block_name(name)]].tolist(), out_dtype=dtype or b.dtype)

    return stream_merge(
        base,
        experts,
        out,
        merge_tensor,
        force=force,
        dtype=dtype,
        device=device,
        progress=progress,
        extra_json=extra_json,
        desc="divmerge",
    )


# ---- configuration file and CLI -------------------------------------------------------------------------


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    data: str


class LearnSettings(BaseModel):
    """Learning settings shared by `blockmerge divmerge` and `blockmerge lora divmerge` YAMLs."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)
    base_model: str
    level: Literal["task", "layer"] = "layer"
    objective: Literal["js", "kl", "entropy"] = "js"
    steps: int | None = Field(default=None, ge=1)
    epochs: float | None = Field(default=None, gt=0)
    batch_size: int = Field(default=16, ge=1)
    samples: int | None = Field(default=None, ge=1)  # prompts per task (first N lines); default all
    max_new_tokens: int = Field(default=16, ge=1)
    eos_token_id: int | None = None
    lr: float = Field(default=1e-2, gt=0)
    init: float | None = None
    seed: int = 0
    device: str = "cpu"
    topk: int = Field(default=64, ge=1)
    full_vocab_max: int = Field(default=4096, ge=0)
    token_chunk: int | None = Field(default=None, ge=1)  # default: ~32 MiB of fp32 logits per chunk
    cache_dir: str | None = None  # teacher passes; default <blockmerge cache>/teacher
    memory: int | str | None = None  # resident blocks budget, e.g. 8GiB; default half the free memory
    dtype: str | None = None  # output dtype (default: the base's)
    compute_dtype: Literal["float32", "float64"] = "float32"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"

    @field_validator("memory")
    @classmethod
    def _memory(cls, v):
        parse_memory(v, "memory")
        return v


class DivMergeConfig(LearnSettings):
    """`blockmerge divmerge` YAML. Paths are absolute, relative to the working directory, or relative to
    the YAML's folder. Data files are .jsonl with one prompt per line: {"text": ...} (tokenized with the
    base model's tokenizer) or {"input_ids": [...]}."""

    models: list[ModelEntry]

    @field_validator("models")
    @classmethod
    def _nonempty(cls, v):
        if not v:
            raise ValueError("at least one model is needed")
        return v


def resolve(p: str, root: Path) -> Path:
    q = Path(p).expanduser()
    if q.is_absolute() or q.exists() or not (root / q).exists():
        return q
    return root / q


def load_yaml_config(path: str | Path | dict, schema: type[LearnSettings], what: str) -> tuple[LearnSettings, Path]:
    """A YAML file (or a dict) validated as `schema`, and the folder relative paths are resolved from.
    `what`: the name of the schema's list of entries, for the error on a non-mapping."""
    if isinstance(path, dict):
        raw, root, where = path, Path.cwd(), "config"
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML ({e})") from e
        root, where = path.parent, str(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping with base_model and {what}")
    try:
        cfg = schema.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        raise ValueError(f"{where}: field {loc}: {err['msg']}") from None
    if cfg.steps is not None and cfg.epochs is not None:
        raise ValueError(f"{where}: give steps or epochs, not both")
    return cfg, root


def load_config(path: str | Path | dict) -> tuple[DivMergeConfig, Path]:
    return load_yaml_config(path, DivMergeConfig, "models")


def resolve_inputs(cfg: LearnSettings, root: Path, key: str, dir_field: str) -> tuple[Path, list[Path], list]:
    """The base folder, the folders of the entries `cfg.<key>` (their `dir_field`) and each entry's prompts."""
    base_dir = resolve(cfg.base_model, root)
    if not base_dir.is_dir():
        raise FileNotFoundError(f"base_model: {base_dir} is not a folder")
    dirs, inputs = [], []
    for i, entry in enumerate(getattr(cfg, key)):
        d = resolve(getattr(entry, dir_field), root)
        if not d.is_dir():
            raise FileNotFoundError(f"{key}.{i}.{dir_field}: {d} is not a folder")
        dirs.append(d)
        inputs.append(read_prompts(resolve(entry.data, root), f"{key}.{i}.data", base_dir, cfg.samples))
    return base_dir, dirs, inputs


def learn_kwargs(
    cfg: LearnSettings, *, steps: int | None, device: str | None, progress: bool, memory: str | None = None
) -> dict:
    """`learn(...)` keyword arguments from the settings; `steps`, `device`, `memory`: command-line overrides
    (checked here, before any work: steps >= 1, a device this machine has)."""
    from blockmerge.io.dtypes import parse_device

    if steps is not None and (type(steps) is not int or steps < 1):
        raise ValueError(f"--steps: {steps!r}, expected an integer >= 1")
    parse_device(device or cfg.device)
    n_steps = steps if steps is not None else cfg.steps
    if n_steps is None and cfg.epochs is None:
        n_steps = 100
    return dict(
        level=cfg.level,
        objective=cfg.objective,
        steps=n_steps,
        epochs=None if n_steps is not None else cfg.epochs,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        max_new_tokens=cfg.max_new_tokens,
        eos_token_id=cfg.eos_token_id,
        init=cfg.init,
        seed=cfg.seed,
        device=device or cfg.device,
        cache_dir=cfg.cache_dir,
        progress=progress,
        topk=cfg.topk,
        full_vocab_max=cfg.full_vocab_max,
        token_chunk=cfg.token_chunk,
        dtype=cfg.compute_dtype,
        attn_implementation=cfg.attn_implementation,
        memory=parse_memory(memory, "--memory") if memory is not None else cfg.memory,
    )


def read_prompts(file: Path, field_name: str, base_dir: Path, samples: int | None) -> list[list[int]]:
    """Prompts of one .jsonl data file as token-id lists."""
    if not file.is_file():
        raise FileNotFoundError(f"{field_name}: data file {file} not found")
    out, tokenizer, vocab = [], None, vocab_size(base_dir)
    with file.open() as f:
        for lineno, line in enumerate(f, 1):
            if samples is not None and len(out) >= samples:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{field_name}: {file}:{lineno}: invalid JSON ({e})") from None
            if isinstance(row, dict) and "input_ids" in row:
                ids = row["input_ids"]
                if not isinstance(ids, list) or not ids or not all(type(i) is int for i in ids):
                    raise ValueError(f"{field_name}: {file}:{lineno}: input_ids must be a non-empty list of ints")
            elif isinstance(row, dict) and isinstance(row.get("text"), str):
                if tokenizer is None:
                    from transformers import AutoTokenizer

                    try:
                        tokenizer = AutoTokenizer.from_pretrained(base_dir)
                    except Exception as e:
                        raise ValueError(
                            f"{field_name}: {file} has text but base_model {base_dir} has no usable tokenizer ({e})"
                        ) from None
                ids = tokenizer(row["text"])["input_ids"]
                if not ids:
                    raise ValueError(f"{field_name}: {file}:{lineno}: text tokenizes to nothing")
            else:
                raise ValueError(f'{field_name}: {file}:{lineno}: expected {{"text": ...}} or {{"input_ids": [...]}}')
            bad = next((i for i in ids if not 0 <= i < vocab), None) if vocab else None
            if bad is not None:
                raise ValueError(f"{field_name}: {file}:{lineno}: token id {bad} outside the vocabulary [0, {vocab})")
            out.append(list(ids))
    if not out:
        raise ValueError(f"{field_name}: {file} has no prompts")
    if samples is not None and len(out) < samples:
        raise ValueError(f"{field_name}: samples is {samples} but {file} has only {len(out)} prompts")
    return out


def vocab_size(model_dir: Path) -> int | None:
    """The vocabulary size in a checkpoint's config.json (its text config's for multimodal ones)."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    v = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    return v if type(v) is int and v > 0 else None


def _is_token_id(i) -> bool:
    """An integer (Python, numpy or a 0-d integer tensor), never a bool or a float."""
    if isinstance(i, torch.Tensor):
        return i.dim() == 0 and not i.is_floating_point() and not i.is_complex() and i.dtype != torch.bool
    return isinstance(i, numbers.Integral) and not isinstance(i, bool) and type(i).__name__ != "bool_"


def check_prompts(inputs: Sequence[Sequence[Sequence[int]]], vocab: int, names: Sequence) -> None:
    """Every prompt a non-empty list of ints in [0, vocab) (a negative id would wrap to the vocabulary's end)."""
    for t, prompts in enumerate(inputs):
        for j, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"inputs[{t}] ({names[t]}): prompt {j} is empty")
            for i in p:
                if not _is_token_id(i):
                    raise ValueError(f"inputs[{t}] ({names[t]}): prompt {j} has token id {i!r}, not an int")
                if not 0 <= int(i) < vocab:
                    raise ValueError(
                        f"inputs[{t}] ({names[t]}): prompt {j}: token id {int(i)} outside the vocabulary [0, {vocab})"
                    )


def run_divmerge(
    config, out, *, force=False, steps=None, device=None, progress=True, memory=None
) -> tuple[Path, LearnResult]:
    """Learn and write: every setting, path and prompt is checked first; OUT is claimed (writer.OutputClaim)
    for the whole run, learning included."""
    cfg, root = load_config(config)
    kwargs = learn_kwargs(cfg, steps=steps, device=device, progress=progress, memory=memory)
    base_dir, expert_dirs, inputs = resolve_inputs(cfg, root, "models", "model")
    used = [
        base_dir,
        *expert_dirs,
        *input_files(cfg, root, "models"),
        *([config] if not isinstance(config, dict) else []),
    ]
    with claim_output(out, force=force, inputs=used):
        return _run_divmerge(cfg, base_dir, expert_dirs, inputs, kwargs, Path(out), force, device, progress)


def input_files(cfg: LearnSettings, root: Path, key: str) -> list[Path]:
    """The data files (and the cache folder) a run reads: OUT may not be one of them."""
    files = [resolve(e.data, root) for e in getattr(cfg, key)]
    return files + ([Path(cfg.cache_dir)] if cfg.cache_dir else [])


def _run_divmerge(cfg, base_dir, expert_dirs, inputs, kwargs, out, force, device, progress) -> tuple[Path, LearnResult]:
    started = time.perf_counter()
    res = learn(base_dir, expert_dirs, inputs, **kwargs)
    info = res.to_json()
    info["base_model"] = str(base_dir)
    info["models"] = [str(d) for d in expert_dirs]
    info["config"] = cfg.model_dump()
    path = write_merged(
        base_dir,
        expert_dirs,
        res.coefficients,
        out,
        force=force,
        dtype=cfg.dtype,
        device=device or cfg.device,
        progress=progress,
        extra_json={"divmerge.json": info},
    )
    if progress:
        from blockmerge.io.report import final_line

        print(
            final_line(
                f"divmerge: {len(res.losses)} steps, loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f}, wrote {path}",
                started,
            ),
            file=sys.stderr,
        )
    return path, res


def add_arguments(p) -> None:
    p.add_argument("config", help="YAML: base_model, models: [{model, data}], level, objective, steps, ...")
    p.add_argument("out", help="output folder: merged checkpoint + divmerge.json")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--steps", type=int, default=None, help="learning steps (overrides the config)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda (overrides the config)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or final line")
    p.add_argument("--memory", default=None, help=MEMORY_HELP)


MEMORY_HELP = (
    "blocks of base and experts kept resident on the device, e.g. 8GiB (overrides the config; default: half "
    "of the free memory); what does not fit is streamed from disk"
)


def run(args) -> int:
    run_divmerge(
        args.config,
        args.out,
        force=args.force,
        steps=args.steps,
        device=args.device,
        progress=not args.no_progress,
        memory=args.memory,
    )
    return 0


def loss(
    base_dir: str | Path,
    expert_dirs: Sequence[str | Path],
    coefficients: torch.Tensor | Sequence[float],
    inputs: Sequence[Sequence[Sequence[int]]],
    *,
    objective: Literal["js", "kl", "entropy"] = "js",
    batch_size: int = 64,
    max_new_tokens: int = 16,
    eos_token_id: int | None = None,
    topk: int = 64,
    full_vocab_max: int = 4096,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    attn_implementation: str = "sdpa",
    progress: bool = False,
) -> float:
    """The DivMerge objective at given coefficients ([T] per task, or [T, n_blocks] per task and block),
    over all of `inputs` (for oracles and inspection): the sum over tasks t of the mean, over every target
    position of task t's prompts, of the divergence between expert t and the merged model (the teacher
    settings as in learn())."""
    merge = StreamedMerge(base_dir, expert_dirs, device=device, attn_implementation=attn_implementation)
    gamma = torch.as_tensor(coefficients, dtype=torch.float32)
    T, nb = merge.T, len(merge.blocks)
    if gamma.shape == (T,):
        gamma = gamma[:, None].expand(T, nb)
    if gamma.shape != (T, nb):
        raise ValueError(f"coefficients: shape {tuple(gamma.shape)}, expected ({T},) or ({T}, {nb})")
    if len(inputs) != T:
        raise ValueError(f"inputs: {len(inputs)} prompt lists for {T} experts")
    spec = TeacherSpec(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, full_vocab_max=full_vocab_max,
                       topk=topk, store_dists=objective != "entropy")  # fmt: skip
    folders = teacher_folders(base_dir, expert_dirs, inputs, Path(cache_dir) if cache_dir else teacher_cache(), spec,
                              device=device, progress=progress, attn_implementation=attn_implementation)  # fmt: skip
    data = TeacherData(folders)
    total = 0.0
    for t in range(T):
        n = data.n_seqs(t)
        weighted, positions = 0.0, 0
        for s in range(0, n, batch_size):
            batch = make_batch([(t, j) for j in range(s, min(n, s + batch_size))], data)
            value, _ = merge.loss_and_grad(gamma, batch, objective, backward=False)
            weighted += value * len(batch.rows)  # the batch's loss is its mean over its positions
            positions += len(batch.rows)
        total += weighted / max(1, positions)
    return total
