"""Training of the built-in suite's models (blockmerge.suite.build): the Llama shape, completion-only
batches and loss, AdamW with warm-up and cosine (or constant) lr, early stopping on a check, a new tag's
embedding row learned at its own lr, and single-threaded deterministic algorithms."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Sequence

import torch
from blockmerge.suite.tasks import EOS_ID, PAD_ID, VOCAB, CharTokenizer, TrainStream


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


def make_batch(pairs: list[tuple[str, str]], tok: CharTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and completion-only labels (-100 on BOS, prompt and padding)."""
    rows, labels = [], []
    for p, a in pairs:
        pi = tok.encode(p, bos=True)
        ai = tok.encode(a, eos=True)
        rows.append(pi + ai)
        labels.append([-100] * len(pi) + ai)
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), PAD_ID, dtype=torch.long)
    lab = torch.full((len(rows), n), -100, dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(lb)] = torch.tensor(lb)
    return ids, lab


def completion_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # right padding + causal attention: real positions never attend to padding, no mask needed
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


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
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.5 * (1 + math.cos(math.pi * s / steps)) if cosine else 1.0)
    )
    model.train()
    hits = 0
    for step in range(steps):
        pairs = [streams[rng.randrange(len(streams))].next() for _ in range(batch_size)]
        ids, lab = make_batch(pairs, tok)
        loss = completion_loss(model, ids, lab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
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
