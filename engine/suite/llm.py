"""A `TaskSuite` (blockmerge.suite.protocol) for a real pretrained causal LM over the templated tasks of
blockmerge.suite.llm_tasks: the suite (test/validation/unlabeled prompts, experts under `root/experts/TASK`),
batched greedy evaluation and task-vector statistics. Fine-tuning the experts and LoRA adapters:
blockmerge.suite.llm_train; diagnostics of DivMerge's loss: blockmerge.suite.llm_diagnose.

Test and validation prompts are distinct and excluded from training and from the unlabeled prompts of the
learned merges."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from blockmerge.suite.llm_tasks import TASKS, distinct_examples, task_rng

# ---- the suite ----------------------------------------------------------------------------------------


@dataclass
class SuiteSizes:
    n_test: int = 200
    n_val: int = 100
    seed: int = 0
    max_prompt_tokens: int = 64  # prompts longer than this are not drawn


class LlmSuite:
    """`TaskSuite` of a base checkpoint folder (with its tokenizer) and experts under `root/experts/TASK`."""

    def __init__(self, base: str | Path, root: str | Path, tasks: Sequence[str], sizes: SuiteSizes | None = None,
                 name: str = "llm"):  # fmt: skip
        from transformers import AutoTokenizer

        self.base = Path(base)
        self.root = Path(root)
        self.name = name
        for t in tasks:
            if t not in TASKS:
                raise ValueError(f"task {t!r}: expected one of {', '.join(TASKS)}")
        self.tasks = tuple(tasks)
        self.sizes = sizes or SuiteSizes()
        self.tokenizer = AutoTokenizer.from_pretrained(self.base)
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"{self.base}: tokenizer has no eos_token")
        self.eos_token_id = int(eos)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else eos)
        self._pairs: dict[tuple[str, str], list[tuple[str, str]]] = {}

    def expert(self, task: str) -> Path:
        return self.root / "experts" / task

    def adapter(self, task: str) -> Path:
        return self.root / "adapters" / task

    def encode_prompt(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        if self.tokenizer.unk_token_id is not None and self.tokenizer.unk_token_id in ids:
            raise ValueError(f"prompt {prompt!r}: a word is not in the tokenizer's vocabulary")
        return ids

    def encode_answer(self, answer: str) -> list[int]:
        """The answer's ids as the model must generate them after the prompt (leading space), EOS excluded."""
        return self.tokenizer.encode(" " + answer, add_special_tokens=False)

    def decode_answer(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def max_new_tokens(self, task: str) -> int:
        return max(len(self.encode_answer(a)) for _, a in self.pairs(task, "test") + self.pairs(task, "val")) + 1

    def _fits(self, prompt: str) -> bool:
        return len(self.encode_prompt(prompt)) <= self.sizes.max_prompt_tokens

    def pairs(self, task: str, split: str) -> list[tuple[str, str]]:
        if split not in ("test", "val"):
            raise ValueError(f"split {split!r}: expected test or val")
        if (task, split) not in self._pairs:
            s = self.sizes
            test = self._pairs.get((task, "test")) or distinct_examples(
                task, "test", s.n_test, s.seed, accept=self._fits
            )
            self._pairs[(task, "test")] = test
            if split == "val":
                held = {p for p, _ in test}
                self._pairs[(task, "val")] = distinct_examples(task, "val", s.n_val, s.seed, held, self._fits)
        return self._pairs[(task, split)]

    def held_out(self, task: str) -> set[str]:
        return {p for p, _ in self.pairs(task, "test") + self.pairs(task, "val")}

    def unlabeled(self, task: str, n: int) -> list[str]:
        pairs = distinct_examples(task, "unlabeled", n, self.sizes.seed, self.held_out(task), self._fits)
        return [p for p, _ in pairs]

    def train_stream(self, task: str, seed: int = 0):
        """Endless training pairs of `task`, never a test or validation prompt."""
        held, rng = self.held_out(task), task_rng(task, f"train{seed}", self.sizes.seed)
        while True:
            prompt, answer = TASKS[task].example(rng)
            if prompt not in held and self._fits(prompt):
                yield prompt, answer


# ---- models: loading, batched greedy evaluation ---------------------------------------------------------


def load_causal_lm(path: str | Path, device: str = "cpu"):
    """fp32 weights: task vectors are ~1e-3 of the weights, below bf16's resolution."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device).eval()


def left_padded(seqs: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), S), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, S - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        mask[i, S - len(s) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def greedy_answers(model, suite: LlmSuite, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 256
                   ) -> list[str]:  # fmt: skip
    """Greedy answers of a batch of prompts (left padding + attention mask, KV cache, stops at EOS)."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=suite.eos_token_id,
                           pad_token_id=suite.pad_token_id)  # fmt: skip
    encoded = [suite.encode_prompt(p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths pad less
    out: list[str] = [""] * len(prompts)
    for s in range(0, len(order), batch_size):
        part = order[s : s + batch_size]
        ids, mask = left_padded([encoded[i] for i in part], suite.pad_token_id, device)
        gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)[:, ids.shape[1] :]
        for row, i in zip(gen.tolist(), part, strict=True):
            if suite.eos_token_id in row:
                row = row[: row.index(suite.eos_token_id)]
            out[i] = suite.decode_answer(row)
    return out


def accuracy(model, suite: LlmSuite, task: str, split: str = "test", batch_size: int = 256) -> float:
    pairs = suite.pairs(task, split)
    got = greedy_answers(model, suite, [p for p, _ in pairs], suite.max_new_tokens(task), batch_size)
    return sum(g == a for g, (_, a) in zip(got, pairs, strict=True)) / len(pairs)


def accuracies(path_or_model, suite: LlmSuite, tasks: Sequence[str], split: str = "test", device: str = "cpu",
               batch_size: int = 256) -> dict[str, float]:  # fmt: skip
    model = load_causal_lm(path_or_model, device) if isinstance(path_or_model, (str, Path)) else path_or_model
    return {t: accuracy(model, suite, t, split, batch_size) for t in tasks}


# ---- task vectors ------------------------------------------------------------------------------------


@torch.no_grad()
def task_vector_stats(base: Path, experts: dict[str, Path], device: str = "cpu") -> dict:
    """Per expert ||tau|| / ||theta0|| and the fraction of weights changed; cosines between task vectors.
    One tensor of every model at a time (tied heads counted once: the checkpoint stores them once)."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    names = list(experts)
    base_files = tensors(base)
    exp_files = {t: tensors(p) for t, p in experts.items()}
    n = len(names)
    dots = torch.zeros(n, n, dtype=torch.float64)
    base_sq, changed, total = 0.0, [0] * n, 0
    for name, f in base_files.items():
        with safe_open(str(f), "pt", device="cpu") as h:
            b = h.get_tensor(name).to(device, torch.float64)
        if not b.is_floating_point():
            continue
        taus = []
        for i, t in enumerate(names):
            with safe_open(str(exp_files[t][name]), "pt", device="cpu") as h:
                tau = h.get_tensor(name).to(device, torch.float64) - b
            changed[i] += int((tau != 0).sum())
            taus.append(tau.reshape(-1))
        T = torch.stack(taus)
        dots += (T @ T.T).cpu()
        base_sq += float((b * b).sum())
        total += b.numel()
    norms = dots.diag().sqrt()
    cos = dots / (norms[:, None] * norms[None, :]).clamp_min(1e-30)
    return {
        "base_norm": math.sqrt(base_sq),
        "relative_norm": {t: float(norms[i]) / math.sqrt(base_sq) for i, t in enumerate(names)},
        "fraction_changed": {t: changed[i] / total for i, t in enumerate(names)},
        "cosine": {a: {b: float(cos[i, j]) for j, b in enumerate(names)} for i, a in enumerate(names)},
    }
