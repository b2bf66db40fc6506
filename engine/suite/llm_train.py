"""Fine-tuning for the real-LLM suite (blockmerge.suite.llm): full-weight experts and PEFT LoRA adapters on
the answer tokens only, and a tiny random base with a word-level tokenizer for smoke runs."""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from blockmerge.suite.llm import LlmSuite, accuracy, load_causal_lm
from blockmerge.suite.llm_tasks import TASKS, task_rng


def training_batch(suite: LlmSuite, pairs: Sequence[tuple[str, str]], device) -> tuple[torch.Tensor, ...]:
    """Right-padded prompt + answer + EOS, labels only on the answer and EOS (-100 elsewhere)."""
    seqs, labels = [], []
    for prompt, answer in pairs:
        p, a = suite.encode_prompt(prompt), suite.encode_answer(answer) + [suite.eos_token_id]
        seqs.append(p + a)
        labels.append([-100] * len(p) + a)
    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), suite.pad_token_id, dtype=torch.long)
    lab = torch.full((len(seqs), S), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), S), dtype=torch.long)
    for i, (s, y) in enumerate(zip(seqs, labels, strict=True)):
        ids[i, : len(s)], lab[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), torch.tensor(y), 1
    return ids.to(device), mask.to(device), lab.to(device)


class TargetNotReached(RuntimeError):
    pass


@dataclass
class FinetuneSettings:
    lr: float = 2e-5
    batch_size: int = 32
    max_steps: int = 400
    check_every: int = 25
    target: float = 0.95  # test accuracy an expert must reach
    warmup: int = 10
    seed: int = 0
    eval_batch: int = 256


def finetune(model, suite: LlmSuite, task: str, s: FinetuneSettings, log: Callable[[str], None] = print,
             params=None, required: bool = True) -> dict:  # fmt: skip
    """Adam on the answer tokens of `task` until validation AND test accuracy reach `s.target` (checked every
    `s.check_every` steps), at most `s.max_steps` steps. Raises TargetNotReached naming the task when
    `required` and the budget ends first. Returns {steps, val, test, loss, seconds}."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    opt = torch.optim.Adam(params, lr=s.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / s.warmup))
    stream = suite.train_stream(task, s.seed)
    started, loss_avg, val, test = time.perf_counter(), float("nan"), 0.0, 0.0
    bar = tqdm(total=s.max_steps, desc=f"fine-tune {task}", unit="step", file=sys.stderr, dynamic_ncols=True)
    step = 0
    try:
        for step in range(1, s.max_steps + 1):
            model.train()
            ids, mask, lab = training_batch(suite, [next(stream) for _ in range(s.batch_size)], device)
            loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_avg = loss.item() if step == 1 else 0.8 * loss_avg + 0.2 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_avg:.3f}", val=f"{val:.2f}")
            if step % s.check_every == 0 or step == s.max_steps:
                model.eval()
                val = accuracy(model, suite, task, "val", s.eval_batch)
                if val >= s.target:
                    test = accuracy(model, suite, task, "test", s.eval_batch)
                    if test >= s.target:
                        break
    finally:
        bar.close()
        model.eval()
    info = {"steps": step, "val": val, "test": test, "loss": loss_avg, "seconds": time.perf_counter() - started}
    log(f"  {task}: {step} steps, val {val:.3f}, test {test:.3f}, loss {loss_avg:.4f} ({info['seconds']:.0f}s)")
    if required and test < s.target:
        raise TargetNotReached(
            f"expert {task}: test accuracy {test:.3f} (val {val:.3f}) < target {s.target} after {step} steps at "
            f"lr {s.lr}; raise --ft-max-steps or --ft-lr"
        )
    return info


def save_checkpoint(model, suite: LlmSuite, out: Path, info: dict) -> Path:
    """save_pretrained + tokenizer + info.json into a temporary folder, renamed into place when complete."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    suite.tokenizer.save_pretrained(tmp)
    (tmp / "info.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def train_expert(suite: LlmSuite, task: str, s: FinetuneSettings, device: str, log=print) -> dict:
    """The full fine-tune of `task` (cached: an existing expert folder with info.json is reused)."""
    out = suite.expert(task)
    if (out / "info.json").exists():
        return json.loads((out / "info.json").read_text())
    torch.manual_seed(s.seed)
    model = load_causal_lm(suite.base, device)
    info = finetune(model, suite, task, s, log)
    save_checkpoint(model, suite, out, info)
    return info


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_adapter(suite: LlmSuite, task: str, s: FinetuneSettings, device: str, rank: int = 8, log=print) -> dict:
    """A PEFT LoRA adapter of `task` (cached). Its accuracy is recorded, not required."""
    from peft import LoraConfig, get_peft_model

    out = suite.adapter(task)
    if (out / "info.json").exists():
        return json.loads((out / "info.json").read_text())
    torch.manual_seed(s.seed)
    base = load_causal_lm(suite.base, device)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
    model = get_peft_model(base, cfg)
    info = finetune(model, suite, task, s, log, required=False)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    cfg_file = tmp / "adapter_config.json"
    adapter_cfg = json.loads(cfg_file.read_text())
    adapter_cfg["base_model_name_or_path"] = str(suite.base)
    cfg_file.write_text(json.dumps(adapter_cfg, indent=1))
    (tmp / "info.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return info


# ---- a tiny random base for smoke runs ----------------------------------------


def tiny_vocabulary(tasks: Sequence[str], n: int = 3000) -> list[str]:
    """Every word and punctuation mark the tasks' templates produce (for the smoke run's word tokenizer)."""
    import re

    words: set[str] = set(str(i) for i in range(100))
    for t in tasks:
        rng = task_rng(t, "vocab", 0)
        for _ in range(n):
            prompt, answer = TASKS[t].example(rng)
            words.update(re.findall(r"\w+|[^\w\s]+", prompt + " " + answer))
    return sorted(words)


TINY_SHAPES = {
    "tiny": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    # SmolLM2-135M's body with the small vocabulary: realistic step times without the model file
    "135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3
    ),
}


def build_tiny_base(out: Path, tasks: Sequence[str], seed: int = 0, shape: str = "tiny") -> Path:
    """A random Llama with a word-level tokenizer over the tasks' words: the smoke run's base."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (out / "config.json").exists():
        return out
    vocab = ["<pad>", "<eos>", "<unk>", *tiny_vocabulary(tasks)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(seed)
    if shape not in TINY_SHAPES:
        raise ValueError(f"shape {shape!r}: expected one of {', '.join(TINY_SHAPES)}")
    cfg = LlamaConfig(vocab_size=len(vocab), max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=0,
                      eos_token_id=1, bos_token_id=1, **TINY_SHAPES[shape])  # fmt: skip
    model = LlamaForCausalLM(cfg)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
