"""DivMerge learning shared by the processes of a torch.distributed job (torchrun, accelerate launch):

    torchrun --nproc-per-node 4 $(which blockmerge) divmerge CONFIG.yml OUT

The base's blocks (embed, layers.i, head) are split into P contiguous pipeline stages balanced by bytes; rank
r runs stage r % P of replica r // P, and the W / P replicas share every batch's rows (data parallel). P is
the largest divisor of the W ranks that leaves no stage empty, at most the number of blocks (or
BLOCKMERGE_PIPELINE_STAGES). A stage keeps its blocks of every model resident while they fit in its memory
budget (the last stage also keeps the embed block when the head is tied to it), else it streams them for
each micro-batch.

One step is a GPipe schedule: a replica cuts its rows into micro-batches (2 P, or BLOCKMERGE_MICRO_BATCHES);
every micro-batch goes forward stage to stage (activations sent with torch.distributed), the last stage
computes its loss and dL/dh at the head, then the gradients go back stage to stage, each stage recomputing
its blocks from the inputs it kept and projecting its weight gradients onto its blocks' columns of
dL/dGamma [T, n_blocks] (a tied head's share lands in the embed column, on the last stage). One all_reduce
sums the gradient and the loss over the ranks, so every rank runs the same Adam update. Each position keeps
its whole-batch loss weight, so the sum over micro-batches and replicas is the one-process loss.

Tensors travel over the job's default backend: gloo on CPU; with `--device cuda` the job is set up as
cpu:gloo,cuda:nccl and activations go GPU to GPU. Control messages go over gloo (blockmerge.merge.distributed)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import timedelta

import torch
import torch.distributed as dist
from blockmerge.io.dtypes import parse_device
from blockmerge.io.stream import BlockSource
from blockmerge.learn.losses import check_objective
from blockmerge.merge.distributed import TIMEOUT_ENV, DistributedError, Group, in_job, partition

STAGES_ENV = "BLOCKMERGE_PIPELINE_STAGES"  # most pipeline stages (default: as many as ranks and blocks allow)
MICRO_ENV = "BLOCKMERGE_MICRO_BATCHES"  # micro-batches per replica and step (default 2 x stages)


def open_group(device: str | torch.device) -> Group:
    """This process's place in the job; for a CUDA run an NCCL backend for tensors beside gloo."""
    if parse_device(device).type != "cuda" or dist.is_initialized():
        return Group()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
    dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timeout)
    group = Group()
    group.owned = True
    return group


@contextlib.contextmanager
def job(device: str | torch.device, group: Group | None = None):
    """`group`, or the job's group when launched as one of several processes (closed after), or None."""
    if group is not None or not in_job():
        yield group
        return
    group = open_group(device)
    try:
        yield group
    finally:
        group.close()


def on_rank_zero(group: Group | None, fn: Callable | None):
    """fn() on rank 0 only (or alone without a group); a failure there stops the others with a DistributedError.
    Returns fn's result on rank 0, None on the others."""
    if group is None:
        return fn()
    if group.rank == 0:
        try:
            result = fn()
        except Exception as e:
            group.broadcast(("error", " ".join(f"{type(e).__name__}: {e}".split())))
            raise
        group.broadcast(("ok", None))
        return result
    status, why = group.broadcast(None)
    if status != "ok":
        raise DistributedError(f"rank 0 failed ({why}); nothing committed")
    return None


def rank_zero_first(group: Group | None, fn: Callable[[bool], object]):
    """fn(True) on rank 0, then fn(False) on the others once it succeeded (the teacher pass: rank 0 fills the
    cache, the others find it complete there: the cache folder must be one every process sees)."""
    first = on_rank_zero(group, lambda: fn(True))
    return first if group is None or group.rank == 0 else fn(False)


def stage_budget(memory: int | None, budget: int) -> int:
    """Each process's share of the default budget (several processes on one machine or GPU); a budget given
    with --memory or `memory` is per process."""
    return budget if memory is not None else budget // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def n_stages(sizes: Sequence[int], world: int, wanted: int | None = None) -> int:
    """The most pipeline stages (at most `wanted`) that divide the ranks evenly and leave no stage empty."""
    for p in range(min(world, len(sizes), wanted or world), 0, -1):
        if world % p == 0 and all(len(r) for r in partition(sizes, p)):
            return p
    return 1


def sub_batch(batch, lo: int, hi: int):
    """Rows lo..hi-1 of a learner.Batch with their target positions; each keeps its whole-batch weight."""
    a, b = torch.searchsorted(batch.rows, torch.tensor([lo, hi])).tolist()
    targets = None if batch.targets is None else batch.targets.slice(slice(a, b))
    return replace(batch, input_ids=batch.input_ids[lo:hi], rows=batch.rows[a:b] - lo, cols=batch.cols[a:b],
                   weights=batch.weights[a:b], targets=targets, tasks=batch.tasks[a:b])  # fmt: skip


class PipelinedMerge:
    """A StreamedMergedModel's loss_and_grad shared by the ranks of a job: this rank's stage of the pipeline of
    its replica. Everything else (T, blocks, model, ...) is the wrapped model's."""

    def __init__(self, merge, group: Group, budget: int, stages: int | None = None, micro: int | None = None):
        self.merge, self.group = merge, group
        m = merge.model
        sizes = [sum(m.ckpt.tensors[n].nbytes for n in b.tensors) for b in merge.blocks]
        self.P = n_stages(sizes, group.size, stages or int(os.environ.get(STAGES_ENV, "0")) or None)
        self.R = group.size // self.P
        self.stage, self.replica = group.rank % self.P, group.rank // self.P
        self.micro = micro or int(os.environ.get(MICRO_ENV, "0")) or 2 * self.P
        ranges = partition(sizes, self.P)
        own = ranges[self.stage]
        self.first, self.last = self.stage == 0, self.stage == self.P - 1
        self.layers = [merge.blocks[i] for i in own if merge.blocks[i].name != "head"]
        learning = [b for b in range(len(merge.blocks) - 1) if merge.learns(b)]
        self.lowest = min(learning, default=len(merge.blocks))  # nothing below it needs a gradient
        self.back = [bk for bk in reversed(self.layers) if m.block_index[bk.name] >= self.lowest]
        self.sends_back = not self.first and ranges[self.stage - 1][-1] >= self.lowest
        keep = {merge.blocks[i].name for i in own} | ({m.embed_block().name} if self.last and m.tied else set())
        src = merge.source  # residency for this stage's blocks only
        merge.source = BlockSource(src.ckpts, device=src.device, resident_max_bytes=budget, dtype=src.dtype, only=keep)
        gpu_wire = merge.device.type == "cuda" and "nccl" in str(dist.get_backend())
        self.wire = merge.device if gpu_wire else torch.device("cpu")

    def __getattr__(self, name):
        return getattr(self.merge, name)

    def loss_and_grad(
        self, gamma: torch.Tensor, batch, objective: str = "js", backward: bool = True
    ) -> tuple[float, torch.Tensor | None]:
        """The one-process loss_and_grad of `batch`, computed by the whole job; every rank gets the result."""
        check_objective(objective, batch.targets)
        gamma = gamma.detach().float().cpu()
        T, nb = self.merge.T, len(self.merge.blocks)
        grad = torch.zeros(T, nb, dtype=torch.float64, device=self.merge.device)
        loss, saved, sends = 0.0, [], []
        # like the one-process step: the autograd graph is kept when this stage's blocks are resident and it fits
        graph = backward and getattr(self.merge, "graph_fits", lambda b: False)(batch)
        for mb in self.micro_batches(batch):
            loss += self._forward(gamma, mb, objective, backward, graph, grad, saved, sends)
        self._wait(sends)
        if backward and (self.last or self.back):
            for state in reversed(saved):
                self._backward(gamma, state, grad, sends)
            self._wait(sends)
        total = torch.cat([grad.flatten().to(self.wire), torch.tensor([loss], dtype=torch.float64, device=self.wire)])
        self.group.call(dist.all_reduce, total)
        total = total.cpu()
        return float(total[-1]), total[:-1].view(T, nb).float() if backward else None

    def micro_batches(self, batch) -> list:
        """This replica's micro-batches: contiguous runs of its contiguous share of the batch's rows."""
        share = torch.arange(batch.input_ids.shape[0]).tensor_split(self.R)[self.replica]
        if not len(share):
            return []
        return [sub_batch(batch, int(p[0]), int(p[-1]) + 1) for p in share.tensor_split(min(len(share), self.micro))]

    def _forward(self, gamma, mb, objective: str, backward: bool, graph: bool, grad, saved: list, sends: list):
        """This stage's blocks on one micro-batch, keeping its autograd graph (`graph`) or, for the backward, each
        layer's input; the last stage's head gives the loss and dL/dh. Returns the loss (0 before the last stage)."""
        merge, m, dev = self.merge, self.merge.model, self.merge.device
        ids = mb.input_ids.to(dev)
        pos = torch.arange(ids.shape[1], device=dev)[None]
        rows = m.token_rows(ids)
        h = masks = None
        if not self.first:
            h = self._recv((*ids.shape, m.config.get_text_config().hidden_size), self.group.rank - 1)
            h.requires_grad_(graph and self.sends_back)
            masks = self._context(ids, pos, rows)
        state = dict(ids=ids, pos=pos, rows=rows, h_in=h, acts={}, finish=[])
        with torch.set_grad_enabled(graph):
            for block, tensors in merge.source.stream(self.layers):
                b = m.block_index[block.name]
                learn = graph and b >= self.lowest  # leaves whose gradients autograd projects into grad[:, b]
                W, finish = merge.block_weights(block, tensors, gamma[:, b], rows, grad[:, b] if learn else None)
                if finish is not None:
                    state["finish"].append(finish)
                if backward and not graph and block.layer is not None:
                    state["acts"][block.layer] = h.to("cpu", copy=dev.type != "cpu")
                h, _, masks = m.block_forward(block, W, ids, pos, rows, h, None, masks)
                del W, tensors
        loss, state["dh"] = 0.0, None
        if self.last:
            head = merge.source.read(m.head_block())
            loss, state["dh"] = merge.head_step(head, gamma, h, mb, objective, backward, grad)
        else:
            sends.append(self._send(h, self.group.rank + 1))
        if backward:
            state.update(masks=masks, out=h if graph else None, shape=h.shape)
            saved.append(state)
        return loss

    def _backward(self, gamma, state: dict, grad, sends: list) -> None:
        """dL/dh back through this stage's blocks for one micro-batch: through the kept graph, or recomputing each
        block from its kept input with its weights as leaves (their gradients projected into grad's column)."""
        dh = state["dh"] if self.last else self._recv(state["shape"], self.group.rank + 1)
        if state["out"] is not None:
            if state["out"].requires_grad:
                state["out"].backward(dh)
            dh = None if state["h_in"] is None else state["h_in"].grad
        else:
            dh = self._recompute_backward(gamma, state, grad, dh)
        for finish in state["finish"]:
            finish()
        if self.sends_back:
            sends.append(self._send(dh, self.group.rank - 1))

    def _recompute_backward(self, gamma, state: dict, grad, dh):
        merge, m, dev = self.merge, self.merge.model, self.merge.device
        ids, pos, rows, masks, acts = (state[k] for k in ("ids", "pos", "rows", "masks", "acts"))
        for block, tensors in merge.source.stream(self.back):
            b = m.block_index[block.name]
            W, finish = merge.block_weights(block, tensors, gamma[:, b], rows, grad[:, b])
            if block.name == "embed":
                m.embed(W, ids, pos, rows).backward(dh)
            else:
                h_in = acts.pop(block.layer).to(dev).requires_grad_(True)
                out = m.layer(block.layer, W, h_in, position_ids=pos, position_embeddings=None, masks=masks)
                out.backward(dh)
                dh = h_in.grad
            finish()
            del W, tensors
        return dh

    def _context(self, ids, pos, rows):
        """The per-layer arguments the embed block gives the layers (masks, position embeddings): they depend on
        shapes and positions only, so the embed block's tensors are zeros of their shapes here."""
        m, dev, dtype = self.merge.model, self.merge.device, self.merge.dtype
        params = {}
        for n in m.embed_block().tensors:
            info = m.ckpt.tensors[n]
            shape = (len(rows), *info.shape[1:]) if n == m.tokens_weight_name else info.shape
            params[n] = torch.zeros(shape, dtype=dtype if info.dtype.is_floating_point else info.dtype, device=dev)
        with torch.no_grad():
            return m.embed_context(params, ids, pos, rows)[1]

    def _send(self, t: torch.Tensor, dst: int):
        t = t.detach().to(self.wire).contiguous()
        return self.group.call(dist.isend, t, dst), t  # the tensor lives until the send is waited for

    def _wait(self, sends: list) -> None:
        for work, _ in sends:
            self.group.call(work.wait)
        sends.clear()

    def _recv(self, shape, src: int) -> torch.Tensor:
        t = torch.empty(shape, dtype=self.merge.dtype, device=self.wire)
        self.group.call(dist.recv, t, src)
        return t.to(self.merge.device)
