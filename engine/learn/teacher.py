"""Teacher pass: each expert's greedy continuations of its task's prompts, and the expert's next-token
distributions at the continuation positions, cached on disk and read back per batch.

Generation runs the expert block by block with a per-layer KV cache (transformers' DynamicCache;
each layer updates its own entry by layer_idx), `gen_batch` prompts at a time, shortest first, left-padded
with an attention mask and per-row position ids; blocks that fit in the memory budget stay resident (in
the compute dtype) for the whole pass, the others are re-read for each token. Generation stops at EOS (kept) or
`max_new_tokens`. The distribution recorded at step i is the expert's p(. | x, y<i) from that same pass
(with the KV cache), i.e. exactly what teacher forcing x + y would give, up to rounding.

The teachers are the experts' checkpoints (ExpertTeachers) or base + adapter t (blockmerge.lora.learn, all
tasks in shared passes); `teacher_folders` is the one cache in front of both.

Storage, per task: `{teacher name}-{key}/chunk{c}.pt` files of at most `chunk_seqs` sequences,
written as they fill and read back memory-mapped (torch.load(mmap=True)), so neither pass holds all
targets in memory:
  tokens [sum len] int64 (prompt + continuation, concatenated), seq_start [n+1], prompt_len [n],
  pos_start [n+1] (rows of the targets), orig [n] (index of the prompt in the input list), and
  probs [N, V] (full vocabulary, when V <= full_vocab_max) or ids [N, k] + probs [N, k] + tail [N]."""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from blockmerge.io.stream import BlockSource
from blockmerge.learn.guard import open_checked
from blockmerge.learn.losses import Targets, topk_targets
from blockmerge.learn.model import StreamedModel


@dataclass(frozen=True)
class TeacherSpec:
    max_new_tokens: int = 16
    eos_token_id: int | None = None
    full_vocab_max: int = 4096
    topk: int = 64
    store_dists: bool = True  # False for the entropy objective: continuations only
    chunk_seqs: int = 64
    gen_batch: int = 64
    dtype: str = "float32"


def fingerprint(path: Path) -> list:
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json"))
    return [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files]


def cache_key(identity: list, prompts: list[list[int]], spec: TeacherSpec) -> str:
    """The one key of a teacher pass: what the teacher is (`identity`), the prompts and the spec."""
    h = hashlib.sha256()
    h.update(json.dumps([*identity, asdict(spec)]).encode())
    h.update(json.dumps(prompts).encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def generate(
    model: StreamedModel,
    source,
    prompts: torch.Tensor | list[list[int]],
    max_new_tokens: int,
    eos_token_id: int | None,
    dtype: torch.dtype = torch.float32,
    keep: Callable[[torch.Tensor], object] | None = None,
    pad_id: int = 0,
) -> tuple[torch.Tensor, list]:
    """Greedy continuation of prompts (equal-length [B, P], or token-id lists of any lengths, left-padded
    with an attention mask and per-row positions): new tokens [B, n] and each step's log-probs [B, V], or
    what `keep(log-probs)` makes of them (so a large vocabulary's rows are not all kept), on the host."""
    from transformers import DynamicCache

    dev = model.device
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, P - len(p) :] = torch.as_tensor(p)
        mask[b, P - len(p) :] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    padded = bool((mask == 0).any())
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    steps, logps = [], []
    done = torch.zeros(len(prompts), dtype=torch.bool, device=dev)
    for _ in range(max_new_tokens):
        logits = model.forward(
            ids, source=source, dtype=dtype, cache=cache, position_ids=pos, last_only=True,
            attention_mask=mask if padded else None,
        )  # fmt: skip
        logp = torch.log_softmax(logits.float(), -1)
        nxt = logp.argmax(-1)
        steps.append(nxt)
        kept = logp if keep is None else keep(logp)
        logps.append(kept.to("cpu") if kept is not None else None)
        if eos_token_id is not None:
            done |= nxt == eos_token_id
            if bool(done.all()):
                break
        ids, pos = nxt[:, None], pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(steps, 1).cpu(), logps


def continuations(
    model: StreamedModel,
    source,
    prompts: list[list[int]],
    spec: TeacherSpec,
    eos: int | None,
    keep: Callable,
    before_batch: Callable[[list[int]], None] | None = None,
    dtype: torch.dtype | None = None,
):
    """Yield (prompt index, continuation up to and with EOS, its targets or None) for every prompt, shortest
    prompts first, `spec.gen_batch` prompts per generation; `before_batch(indices)` runs before each.
    `dtype`: compute dtype (default `spec.dtype`)."""
    dtype = dtype or getattr(torch, spec.dtype)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for s in range(0, len(order), spec.gen_batch):
        part = order[s : s + spec.gen_batch]
        if before_batch is not None:
            before_batch(part)
        new, steps = generate(model, source, [prompts[i] for i in part], spec.max_new_tokens, eos, dtype, keep)
        for r, i in enumerate(part):
            cont = new[r].tolist()
            if eos is not None and eos in cont:
                cont = cont[: cont.index(eos) + 1]
            targets = None
            if spec.store_dists:
                targets = Targets.cat([steps[j].slice(slice(r, r + 1)) for j in range(len(cont))])
            yield i, cont, targets


class ChunkWriter:
    def __init__(self, folder: Path, spec: TeacherSpec, full: bool):
        self.folder, self.spec, self.full = folder, spec, full
        self.rows: list[tuple] = []
        self.sizes: list[int] = []

    def add(self, orig: int, prompt: list[int], cont: list[int], targets: Targets | None):
        self.rows.append((orig, prompt, cont, targets))
        if len(self.rows) >= self.spec.chunk_seqs:
            self.flush()

    def flush(self):
        if not self.rows:
            return
        seqs = [torch.tensor(p + c, dtype=torch.int64) for _, p, c, _ in self.rows]
        d = {
            "tokens": torch.cat(seqs),
            "seq_start": torch.tensor([0] + [len(s) for s in seqs]).cumsum(0),
            "prompt_len": torch.tensor([len(p) for _, p, _, _ in self.rows]),
            "pos_start": torch.tensor([0] + [len(c) for _, _, c, _ in self.rows]).cumsum(0),
            "orig": torch.tensor([o for o, _, _, _ in self.rows]),
        }
        if self.spec.store_dists:
            t = Targets.cat([r[3] for r in self.rows])
            d["probs"] = t.probs.contiguous()
            if t.topk:
                d["ids"], d["tail"] = t.ids.contiguous(), t.tail.contiguous()
        f = self.folder / f"chunk{len(self.sizes)}.pt"
        torch.save(d, f.with_suffix(".tmp"))
        os.replace(f.with_suffix(".tmp"), f)
        self.sizes.append(len(self.rows))
        self.rows = []


def step_targets(config, spec: TeacherSpec):
    """(vocab size, full vocabulary?, EOS id, keep) for a teacher pass: keep(log_probs) reduces one generation
    step to full probabilities or top-k + tail at once (never [batch, steps, vocab]), or to None when only the
    continuations are needed."""
    vocab = config.get_text_config().vocab_size
    full = vocab <= spec.full_vocab_max
    eos = spec.eos_token_id
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, list) else eos
    if not spec.store_dists:
        keep = lambda lp: None
    elif full:
        keep = lambda lp: Targets(probs=lp.exp())
    else:
        keep = lambda lp: topk_targets(lp, spec.topk)
    return vocab, full, eos, keep


class TeacherRun(NamedTuple):
    """One streamed model pass that generates for the teachers of `tasks`."""

    tasks: list[int]
    model: StreamedModel
    source: BlockSource
    dtype: torch.dtype
    select: Callable[[list[int]], None] | None = None  # before each generation batch: the task of each row


def teacher_folders(teachers, inputs, cache_dir: str | Path, spec: TeacherSpec, progress: bool = True) -> list[Path]:
    """Folders of each task's teacher outputs on its prompts (`inputs[t]`), generated where the cache under
    `cache_dir` has no complete one: `{name}-{key}`, key = hash of (`teachers.teacher_key(t)`, prompts, spec),
    so one cache_dir serves any run. `teachers`: a StreamedMergedModel (blockmerge.learn.protocol) or
    ExpertTeachers."""
    from blockmerge.io.report import progress as bar

    prompts = [[list(map(int, p)) for p in x] for x in inputs]
    for t, x in enumerate(prompts):
        for i, p in enumerate(x):
            if not p:
                raise ValueError(f"prompt {i} of task {t} ({teachers.teacher_key(t)[0]}) is empty")
    folders, keys, todo = [], [], []
    for t, x in enumerate(prompts):
        name, identity = teachers.teacher_key(t)
        keys.append(cache_key(identity, x, spec))
        folders.append(Path(cache_dir) / f"{name}-{keys[t]}")
        if not _complete(folders[t], keys[t]):
            todo.append(t)
    if todo:
        with bar(sum(len(prompts[t]) for t in todo), "teacher", unit="seq", disable=not progress) as pbar:
            for run in teachers.teachers(todo, spec):
                _generate(run, prompts, folders, keys, spec, pbar)
                del run  # its resident blocks go before the next run's are read
    return folders


def _complete(folder: Path, key: str) -> bool:
    """Whether `folder` holds a finished pass for `key`; if not, it is emptied for a new one."""
    manifest = folder / "manifest.json"
    try:
        if manifest.exists() and json.loads(manifest.read_text()).get("key") == key:
            return True
    except json.JSONDecodeError:
        pass
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("chunk*.pt"):
        old.unlink()
    manifest.unlink(missing_ok=True)
    return False


def _generate(run: TeacherRun, prompts, folders: list[Path], keys: list[str], spec: TeacherSpec, pbar) -> None:
    """Continuations and distributions of the run's tasks, written chunk by chunk, then each manifest."""
    vocab, full, eos, keep = step_targets(run.model.config, spec)
    writers = {t: ChunkWriter(folders[t], spec, full) for t in run.tasks}
    pairs = [(t, i) for t in run.tasks for i in range(len(prompts[t]))]
    select = None if run.select is None else (lambda rows: run.select([pairs[r][0] for r in rows]))
    flat = [prompts[t][i] for t, i in pairs]
    for r, cont, targets in continuations(run.model, run.source, flat, spec, eos, keep, select, run.dtype):
        t, i = pairs[r]
        writers[t].add(i, prompts[t][i], cont, targets)
        pbar.update(1)
    for t in run.tasks:
        writers[t].flush()
        info = {"key": keys[t], "chunks": writers[t].sizes, "full_vocab": full, "vocab": vocab,
                "n_seqs": len(prompts[t]), "spec": asdict(spec)}  # fmt: skip
        (folders[t] / "manifest.json").write_text(json.dumps(info))


class ExpertTeachers:
    """Teachers that are checkpoints of their own (full experts): each runs alone, streamed from its folder
    with the blocks that fit in `resident_max_bytes` kept resident."""

    def __init__(self, expert_dirs, *, device="cpu", attn_implementation="sdpa", resident_max_bytes: int = 1 << 29):
        self.expert_dirs = [Path(e) for e in expert_dirs]
        self.device, self.attn_implementation, self.budget = device, attn_implementation, resident_max_bytes

    def teacher_key(self, t: int) -> tuple[str, list]:
        d = self.expert_dirs[t]
        return d.name, [str(d.resolve()), fingerprint(d)]

    def teachers(self, tasks, spec: TeacherSpec):
        dtype = getattr(torch, spec.dtype)
        for t in tasks:
            model = open_checked(self.expert_dirs[t], attn_implementation=self.attn_implementation, device=self.device)
            yield TeacherRun([t], model, model.source(self.budget, dtype=dtype), dtype)


def teacher_pass(expert_dir, prompts, cache_root, spec: TeacherSpec, *, device="cpu", attn_implementation="sdpa",
                 resident_max_bytes: int = 1 << 29, progress: bool = False) -> Path:  # fmt: skip
    """The cached teacher pass of one expert checkpoint on `prompts` (see teacher_folders)."""
    teachers = ExpertTeachers([expert_dir], device=device, attn_implementation=attn_implementation,
                              resident_max_bytes=resident_max_bytes)  # fmt: skip
    return teacher_folders(teachers, [prompts], cache_root, spec, progress)[0]


class TeacherData:
    """Read-back of the cached teacher passes of all tasks, one sequence at a time (memory-mapped)."""

    def __init__(self, folders: list[Path], max_open: int = 16):
        self.folders = [Path(f) for f in folders]
        self.manifests = [json.loads((f / "manifest.json").read_text()) for f in self.folders]
        self.max_open = max_open
        self._open: OrderedDict[tuple[int, int], dict] = OrderedDict()
        self._where: list[list[tuple[int, int]]] = []
        for m in self.manifests:
            loc = []
            for c, n in enumerate(m["chunks"]):
                loc += [(c, r) for r in range(n)]
            self._where.append(loc)

    def n_seqs(self, task: int) -> int:
        return len(self._where[task])

    def _chunk(self, task: int, c: int) -> dict:
        k = (task, c)
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        d = torch.load(self.folders[task] / f"chunk{c}.pt", mmap=True, weights_only=True)
        self._open[k] = d
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return d

    def get(self, task: int, j: int) -> tuple[torch.Tensor, int, Targets | None]:
        """(tokens = prompt + continuation, prompt length, targets for the continuation positions)."""
        c, r = self._where[task][j]
        d = self._chunk(task, c)
        s0, s1 = int(d["seq_start"][r]), int(d["seq_start"][r + 1])
        p0, p1 = int(d["pos_start"][r]), int(d["pos_start"][r + 1])
        targets = None
        if "probs" in d:
            targets = Targets(
                probs=d["probs"][p0:p1].clone(),
                ids=d["ids"][p0:p1].long() if "ids" in d else None,
                tail=d["tail"][p0:p1].clone() if "tail" in d else None,
            )
        return d["tokens"][s0:s1].clone(), int(d["prompt_len"][r]), targets
