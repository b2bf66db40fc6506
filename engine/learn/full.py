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

from collections.abc import Sequence
from pathlib import Path

import torch
from blockmerge.io.checkpoint import Checkpoint, block_name, check_compatible
from blockmerge.io.stream import BlockSource
from blockmerge.kernels import combine, project
from blockmerge.learn import learner
from blockmerge.learn.learner import Batch, LearnResult
from blockmerge.learn.losses import check_objective
from blockmerge.learn.protocol import StreamedBase
from blockmerge.learn.settings import DivMergeConfig, LearnSettings, with_overrides
from blockmerge.learn.teacher import ExpertTeachers, TeacherSpec

LOGITS_CHUNK_BYTES = 32 << 20


class StreamedMerge(StreamedBase):
    """The merged model theta(Gamma) of a base and experts, streamed block by block: loss and dL/dGamma
    (a blockmerge.learn.protocol.StreamedMergedModel; each expert checkpoint is its own teacher)."""

    command, entries, noun = "divmerge", ("models", "model"), "expert"
    settings_type, config_type = LearnSettings, DivMergeConfig

    def __init__(self, base_dir, expert_dirs, *, resident_max_bytes: int = 0, teacher_memory: int | None = None,
                 **options):  # fmt: skip
        """`options`: device, dtype (compute), attn_implementation, token_chunk (StreamedBase; default
        positions of ~LOGITS_CHUNK_BYTES of fp32 logits); `teacher_memory`: the experts' teacher passes'
        budget (default `resident_max_bytes`)."""
        super().__init__(base_dir, **options)
        self.experts = [Checkpoint(e) for e in expert_dirs]
        if not self.experts:
            raise ValueError("divmerge needs at least one expert model")
        check_compatible(self.base, self.experts)
        self.source = BlockSource([self.base, *self.experts], device=self.device, resident_max_bytes=resident_max_bytes)
        self.budget = resident_max_bytes
        vocab = self.model.config.get_text_config().vocab_size
        self.token_chunk = self.token_chunk or max(16, LOGITS_CHUNK_BYTES // (4 * vocab))
        self.T = len(self.experts)
        self.expert_teachers = ExpertTeachers(
            expert_dirs, device=self.device, attn_implementation=options.get("attn_implementation", "sdpa"),
            resident_max_bytes=resident_max_bytes if teacher_memory is None else teacher_memory,
        )  # fmt: skip

    def teacher_key(self, t: int) -> tuple[str, list]:
        return self.expert_teachers.teacher_key(t)

    def teachers(self, tasks: Sequence[int], spec: TeacherSpec):
        return self.expert_teachers.teachers(tasks, spec)

    @staticmethod
    def write(base_dir, dirs, coefficients, out, settings, *, force, progress, info) -> Path:
        return write_merged(base_dir, dirs, coefficients, out, force=force, dtype=settings.dtype,
                            device=settings.device, progress=progress, extra_json={"divmerge.json": info})  # fmt: skip

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
        # per-expert tensors count twice: the fused parameter (blockmerge.learn.fused) is a copy kept for backward
        fused = self.model.layout.fusions
        twice = lambda n: 2 if self.model.module_names.get(n) in fused else 1  # noqa: E731
        numel = sum(t.nbytes // t.dtype.itemsize * twice(n) for n, t in self.base.tensors.items())
        merged = numel * self.dtype.itemsize
        return self.source.resident_bytes + merged + acts <= self.budget

    def loss_and_grad(
        self, gamma: torch.Tensor, batch: Batch, objective: str = "js", backward: bool = True
    ) -> tuple[float, torch.Tensor | None]:
        """Loss of `batch` at coefficients gamma [T, n_blocks] and, with `backward`, dL/dGamma [T, n_blocks].
        When the models and the step's graph fit in the memory budget (`graph_fits`), the forward keeps its
        graph and the backward runs once through it; otherwise blocks are streamed and each block is
        recomputed in the backward pass."""
        check_objective(objective, batch.targets)
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
                    h, pe, masks = m.block_forward(block, W, ids, pos, rows, h, pe, masks)
                    acts.append(h.to("cpu", copy=dev.type != "cpu"))
                del W
                continue
            # head: loss at the target positions, in chunks, with gradients for h_L and the head weights
            loss, dh = self.head_step(tensors, gamma, h, batch, objective, backward, grad)
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

    def head_step(self, tensors, gamma, h, batch: Batch, objective: str, backward: bool, grad: torch.Tensor):
        """Final norm + lm_head + divergence at the target positions of h (in chunks). With `backward`, the head's
        (and the tied embedding's) coefficient gradients go into `grad`, and dL/dh is returned beside the loss."""
        m = self.model
        b = m.block_index["head"]
        W = self.merged(tensors, gamma[:, b].tolist(), grad=backward)
        emb_tensors, E = None, None
        if m.tied:
            emb_tensors = self.source.read(m.embed_block())
            E = self.merged(
                emb_tensors, gamma[:, m.block_index["embed"]].tolist(), names=[m.tokens_weight_name], grad=backward
            )
        head_w = E[m.tokens_weight_name] if m.tied else W[m.head_weight_name]
        loss, dh = m.head_loss(W, head_w, h, batch, objective, self.token_chunk, backward)
        if backward:
            self._project(W, tensors, grad[:, b])
            if m.tied:
                self._project(E, emb_tensors, grad[:, m.block_index["embed"]])
        return loss, dh

    # ---- one block at a time: the pieces of a pipeline stage (blockmerge.learn.pipeline) ----------------
    def learns(self, b: int) -> bool:
        """Whether block b has a coefficient gradient (every block of full task vectors has)."""
        return True

    def block_weights(self, block, tensors, coeffs: torch.Tensor, rows, grad_col: torch.Tensor | None = None):
        """(weights, finish) of one block at coefficients `coeffs` (Gamma[:, b]): without `grad_col`, merged
        weights for a forward without grad (finish None); with it, leaves whose gradients are projected into
        `grad_col` [T] as autograd produces them, finish() projecting any the hooks did not see."""
        if block.name == "embed":
            tensors = self._embed_rows(tensors, rows)
        if grad_col is None:
            return self.merged(tensors, coeffs.tolist()), None
        W = self._merged_projecting(tensors, coeffs.tolist(), grad_col)
        return W, lambda: self._project(W, tensors, grad_col)

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
                h, pe, masks = m.block_forward(block, W, ids, pos, rows, h, pe, masks)
                del W
        loss, dh = self.head_step(self.source.read(m.head_block()), gamma, h, batch, objective, backward, grad)
        if not backward:
            return loss, None
        h.backward(dh)  # the hooks project each block's weight gradients as autograd produces them
        return loss, grad.float().cpu()


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


def learn(base_dir, expert_dirs, inputs, settings: LearnSettings | None = None, **overrides) -> LearnResult:
    """Learn merge coefficients. `inputs[t]` are task t's prompts (lists of token ids, no padding);
    `settings` (LearnSettings, the YAML's fields) with keyword `overrides` of its fields, e.g.
    `learn(base, experts, inputs, level="task", steps=50)`. Returns coefficients [T, n_blocks] (task level:
    the same value in every block of a task). `memory`: bytes (or '8GiB') of base and expert blocks kept
    resident while learning and during each expert's teacher pass; default half of the free memory.
    `cache_dir`: teacher passes, reused across runs; default `<blockmerge cache>/teacher`.
    `progress` (default True), `num_threads`: see blockmerge.learn.learner.learn."""
    return learner.learn(StreamedMerge, base_dir, expert_dirs, inputs, settings, **overrides)


def run_divmerge(config, out, *, force=False, steps=None, device=None, progress=True, memory=None):
    """`blockmerge divmerge CONFIG OUT`: learn and write (blockmerge.learn.learner.run_divmerge)."""
    return learner.run_divmerge(StreamedMerge, config, out, force=force, progress=progress, steps=steps,
                                device=device, memory=memory)  # fmt: skip


def loss(
    base_dir: str | Path,
    expert_dirs: Sequence[str | Path],
    coefficients: torch.Tensor | Sequence[float],
    inputs: Sequence[Sequence[Sequence[int]]],
    settings: LearnSettings | None = None,
    *,
    progress: bool = False,
    **overrides,
) -> float:
    """The DivMerge objective at given coefficients ([T] per task, or [T, n_blocks] per task and block),
    over all of `inputs` (for oracles and inspection): the sum over tasks t of the mean, over every target
    position of task t's prompts, of the divergence between expert t and the merged model (settings as in
    learn(); `batch_size` only sets how many prompts go through at once)."""
    s = with_overrides(settings, LearnSettings, overrides)
    merge = StreamedMerge(base_dir, expert_dirs, device=s.device, attn_implementation=s.attn_implementation,
                          teacher_memory=1 << 29)  # fmt: skip
    gamma = torch.as_tensor(coefficients, dtype=torch.float32)
    T, nb = merge.T, len(merge.blocks)
    if gamma.shape == (T,):
        gamma = gamma[:, None].expand(T, nb)
    if gamma.shape != (T, nb):
        raise ValueError(f"coefficients: shape {tuple(gamma.shape)}, expected ({T},) or ({T}, {nb})")
    if len(inputs) != T:
        raise ValueError(f"inputs: {len(inputs)} prompt lists for {T} experts")
    data = learner.teacher_data(merge, inputs, s, progress)
    total = 0.0
    for t in range(T):
        n = data.n_seqs(t)
        weighted, positions = 0.0, 0
        for i in range(0, n, s.batch_size):
            batch = learner.make_batch([(t, j) for j in range(i, min(n, i + s.batch_size))], data)
            value, _ = merge.loss_and_grad(gamma, batch, s.objective, backward=False)
            weighted += value * len(batch.rows)  # the batch's loss is its mean over its positions
            positions += len(batch.rows)
        total += weighted / max(1, positions)
    return total
