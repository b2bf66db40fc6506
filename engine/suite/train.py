"""Training of the built-in suite's models (blockmerge.suite.build): the Llama shape, completion-only
batches and loss, AdamW with warm-up and cosine (or constant) lr, early stopping on a check, a new tag's
embedding row learned at its own lr, and single-threaded deterministic algorithms."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from blockmerge.suite.tasks import EOS_ID, PAD_ID, UNKNOWN_TAG, VOCAB, CharTokenizer, TrainStream


def model_config(cfg):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=1,
        eos_token_id=EOS_ID,
        torch_dtype="float32",
    )


# Examples are packed into rows of at least this many tokens: the suite's examples are 8-18 tokens, and
# padding every one to the batch's longest wastes a third of the compute.
ROW_TOKENS = 54


@dataclass
class PackedBatch:
    """A batch of (prompt, answer) examples packed into rows: `positions` restart at 0 with each example,
    from which transformers builds a block-diagonal causal mask (masking_utils.find_packed_sequence_indices),
    so no example sees another. `answer_at` are the flat indices of the positions whose next token is an
    answer token (`answers`, of example `example`): the loss is computed there only (completion-only).
    `unknown_at` are the flat indices of the tags written UNKNOWN_TAG, whose embedding the forward replaces
    by a random one (tasks.UnknownTagStream)."""

    ids: torch.Tensor
    positions: torch.Tensor
    answer_at: torch.Tensor
    answers: torch.Tensor
    example: torch.Tensor
    unknown_at: torch.Tensor


def pack_batch(pairs: Sequence[tuple[str, str]], tok: CharTokenizer, row_tokens: int = ROW_TOKENS) -> PackedBatch:
    """Pack BOS + prompt + answer + EOS of each pair into rows of `row_tokens` (or the longest example's
    length if more), first fit, longest first; each row ends with PAD, a block of its own."""
    seqs = [(tok.encode(p, bos=True), tok.encode(a, eos=True)) for p, a in pairs]
    size = [len(p) + len(a) for p, a in seqs]
    width = max(row_tokens, max(size))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(seqs)), key=lambda i: -size[i]):  # stable: ties keep the pairs' order
        r = next((r for r, f in enumerate(free) if f >= size[i]), len(rows))
        if r == len(rows):
            rows.append([])
            free.append(width)
        rows[r].append(i)
        free[r] -= size[i]
    ids, positions, answer_at, answers, example, unknown_at = [], [], [], [], [], []
    unknown = tok.ids[UNKNOWN_TAG]
    for r, members in enumerate(rows):
        row, pos = [], []
        for i in members:
            prompt, answer = seqs[i]
            if prompt[1] == unknown:  # [BOS, tag, ...]
                unknown_at.append(r * width + len(row) + 1)
            start = r * width + len(row) + len(prompt) - 1  # the last prompt token predicts the first answer token
            answer_at += range(start, start + len(answer))
            answers += answer
            example += [i] * len(answer)
            row += prompt + answer
            pos += range(len(prompt) + len(answer))
        pos += range(width - len(row))
        ids.append(row + [PAD_ID] * (width - len(row)))
        positions.append(pos)
    return PackedBatch(*(torch.tensor(x) for x in (ids, positions, answer_at, answers, example, unknown_at)))


def answer_logits(model, batch: PackedBatch) -> torch.Tensor:
    """Logits at the answer positions only (the head is applied there only), teacher-forced. An UNKNOWN_TAG
    tag is embedded as a fresh random vector, drawn as the row of a token the model never saw is initialised
    (normal, std `initializer_range`): the model meets as many unknown tags as such examples."""
    if len(batch.unknown_at):
        embeds = model.get_input_embeddings()(batch.ids)
        noise = torch.randn(len(batch.unknown_at), embeds.shape[-1], dtype=embeds.dtype)
        noise = noise * model.config.initializer_range
        embeds = embeds.flatten(0, 1).index_copy(0, batch.unknown_at, noise).view_as(embeds)
        inputs = {"inputs_embeds": embeds}
    else:
        inputs = {"input_ids": batch.ids}
    hidden = model.get_decoder()(**inputs, position_ids=batch.positions, use_cache=False)[0]
    return model.get_output_embeddings()(hidden.flatten(0, 1)[batch.answer_at])


def completion_loss(model, batch: PackedBatch) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens."""
    return torch.nn.functional.cross_entropy(answer_logits(model, batch), batch.answers)


@torch.inference_mode()
def exact_match(model, pairs: Sequence[tuple[str, str]], tok: CharTokenizer) -> float:
    """evaluate.accuracy (greedy decoding, exact match) in one teacher-forced pass: greedy decoding yields the
    answer then EOS exactly when the argmax after the prompt and each correct prefix of the answer is the
    answer's next token, EOS last. One packed forward instead of a decoding step per token and prompt length."""
    batch = pack_batch(pairs, tok)
    wrong = (answer_logits(model, batch).argmax(-1) != batch.answers).long()
    per_example = torch.zeros(len(pairs), dtype=torch.long).index_add_(0, batch.example, wrong)
    return (per_example == 0).double().mean().item()


def train(
    model,
    streams: list[TrainStream],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    desc: str,
    bar=None,
    cosine: bool = True,
    check=None,
    check_every: int = 0,
    patience: int = 1,
    new_tokens: Sequence[int] = (),
    new_token_lr: float = 0.0,
) -> int:
    """AdamW with linear warm-up then cosine decay (or constant lr); each batch draws its tasks uniformly
    from `streams`. With `check`, stop as soon as check(model) was true `patience` times in a row (tested
    every `check_every` steps). `bar` (tqdm) advances one per step. Returns the number of steps taken.

    With `new_tokens`, the input embeddings of the base's known tokens stay frozen and the rows of
    `new_tokens` (a tag the base never saw) learn with their own `new_token_lr`, as when a token is added to
    a pretrained model's vocabulary: a new row starts far from where it must go."""
    tok = CharTokenizer()
    rng = random.Random(f"batches/{seed}/{desc}")
    emb = model.get_input_embeddings().weight
    groups = [{"params": [p for p in model.parameters() if p is not emb or not new_tokens]}]
    if new_tokens:
        keep = torch.zeros(emb.shape[0], 1)
        keep[list(new_tokens)] = 1.0
        emb.register_hook(lambda g: g * keep)
        groups.append({"params": [emb], "lr": new_token_lr})
    # fused: one kernel over all parameters instead of a dozen per tensor (0.2M parameters: launches dominate)
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0, betas=(0.9, 0.98), fused=True)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.5 * (1 + math.cos(math.pi * s / steps)) if cosine else 1.0)
    )
    model.train()
    hits = 0
    for step in range(steps):
        pairs = [streams[rng.randrange(len(streams))].next() for _ in range(batch_size)]
        loss = completion_loss(model, pack_batch(pairs, tok))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        sched.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{desc} loss {loss.item():.3f}", refresh=False)
        if check is not None and check_every and (step + 1) % check_every == 0:
            model.eval()
            hits = hits + 1 if check(model) else 0
            if hits >= patience:
                return step + 1
            model.train()
    model.eval()
    return steps


@contextlib.contextmanager
def deterministic_single_thread():
    """One intra-op thread and deterministic algorithms while training, the caller's settings restored after:
    the weights do not depend on the caller's thread count (reductions split over threads round
    differently), and no nondeterministic kernel is used."""
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.set_num_threads(threads)
