"""A `TaskSuite` (blockmerge.suite.protocol) for a real pretrained causal LM: six templated tasks with exact answers
(nothing downloaded), experts fully fine-tuned from the base on the answer tokens only, LoRA adapters,
batched greedy evaluation, task-vector statistics, and the diagnostics of DivMerge's loss.

Tasks are posed as plain prompts (no chat template: shorter sequences, and the instruct model's chat habits
do not matter since the answers are code words it cannot guess):

    {input text}\\n{Field} code:  -> " {label}" EOS        (classification: one label word)
    {input text}\\n{Field}:       -> " {answer}" EOS       (generation: a short exact answer)

Classification labels are arbitrary code words (single tokens in SmolLM2's tokenizer: ' blue', ' north',
...), so the base is near 0 and only fine-tuning teaches the mapping, as GLUE's label ids need a
classifier head. Each split is drawn from a seeded generator; test and validation prompts are distinct
and excluded from training and from the unlabeled prompts of the learned merges."""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

# ---- tasks --------------------------------------------------------------------------------------------

ITEMS = "soup film hotel phone book concert pizza game chair laptop album museum bike coffee show garden".split()
POSITIVE = "wonderful great excellent delightful superb lovely fantastic brilliant pleasant charming".split()
NEGATIVE = "awful terrible boring horrible disappointing dreadful poor annoying mediocre unpleasant".split()
ADVERBS = ["", "really ", "quite ", "truly ", "rather ", "very "]
SENTIMENT_FORMS = ["The {item} was {adv}{adj}.", "I found the {item} {adv}{adj}.", "Our {item} felt {adv}{adj}.",
                   "Honestly, the {item} is {adv}{adj}.", "That {item} seemed {adv}{adj} to me."]  # fmt: skip

NAMES = "Anna Ben Carla David Emma Frank Grace Henry Iris Jack Kate Leo Mia Noah Olga Paul Rosa Sam Tina Victor".split()
TOPICS = {
    "sports": ["scored a late goal", "won the tennis final", "ran the marathon", "joined the football team",
               "trained at the stadium", "lost the boxing match", "broke the swimming record"],
    "food": ["baked fresh bread", "cooked a spicy curry", "ordered a cheese pizza", "tasted the lemon cake",
             "grilled some fish", "made a tomato soup", "ate a bowl of rice"],
    "weather": ["watched the storm arrive", "saw heavy rain all day", "felt the cold wind", "noticed thick fog",
                "enjoyed the warm sunshine", "measured the snowfall", "heard the thunder roll"],
    "music": ["played the piano", "sang in the choir", "tuned the guitar", "wrote a new song",
              "listened to the orchestra", "practised the violin", "recorded an album"],
}  # fmt: skip
WHEN = ["", " yesterday", " today", " last week", " on Sunday", " this morning", " at night"]
OBJECTS = "apple book key lamp coin map cup hat ring pen box shoe clock bell kite rope".split()
COLORS = "red blue green black white small large old new".split()
SUBJECTS = [("dog", "dogs"), ("cat", "cats"), ("teacher", "teachers"), ("child", "children"), ("bird", "birds"),
            ("farmer", "farmers"), ("doctor", "doctors"), ("student", "students"), ("horse", "horses")]  # fmt: skip
VERBS = [("runs", "run"), ("sleeps", "sleep"), ("sings", "sing"), ("walks", "walk"), ("waits", "wait"),
         ("plays", "play"), ("works", "work"), ("eats", "eat")]  # fmt: skip
PLACES = ["in the park", "near the river", "every day", "at home", "in the garden", "after lunch", "quietly"]
WORDS = "river stone cloud apple music table window garden silver forest candle bridge yellow ocean winter".split()
ORDINALS = ["first", "second", "last"]


@dataclass(frozen=True)
class LlmTask:
    name: str
    field: str  # the word before the answer: "Sentiment code", "Largest", ...
    make: Callable[[random.Random], tuple[str, str]]  # rng -> (input text, answer)
    labels: tuple[str, ...] = ()  # classification: the label words; generation: ()

    def example(self, rng: random.Random) -> tuple[str, str]:
        text, answer = self.make(rng)
        return f"{text}\n{self.field}:", answer


def _sentiment(rng):
    pos = rng.random() < 0.5
    form = rng.choice(SENTIMENT_FORMS)
    adj = rng.choice(POSITIVE if pos else NEGATIVE)
    return "Review: " + form.format(item=rng.choice(ITEMS), adv=rng.choice(ADVERBS), adj=adj), (
        "blue" if pos else "red"
    )


TOPIC_CODES = {"sports": "north", "food": "south", "weather": "east", "music": "west"}


def _topic(rng):
    topic = rng.choice(list(TOPICS))
    return f"Sentence: {rng.choice(NAMES)} {rng.choice(TOPICS[topic])}{rng.choice(WHEN)}.", TOPIC_CODES[topic]


def _entailment(rng):
    name = rng.choice(NAMES)
    a, b, c = rng.sample(OBJECTS, 3)
    ca, cb = rng.choice(COLORS), rng.choice(COLORS)
    entailed = rng.random() < 0.5
    obj = rng.choice([a, b]) if entailed else c
    premise = f"{name} bought a {ca} {a} and a {cb} {b}."
    return f"Premise: {premise}\nHypothesis: {name} bought a {obj}.", ("apple" if entailed else "pear")


def _grammar(rng):
    sing, plur = rng.choice(SUBJECTS)
    v_sing, v_plur = rng.choice(VERBS)
    plural = rng.random() < 0.5
    correct = rng.random() < 0.5
    verb = (v_plur if plural else v_sing) if correct else (v_sing if plural else v_plur)
    subject = plur if plural else sing
    return f"Text: The {subject} {verb} {rng.choice(PLACES)}.", ("gold" if correct else "silver")


def _largest(rng):
    nums = rng.sample(range(10, 100), rng.choice([3, 4]))
    return "Numbers: " + ", ".join(map(str, nums)), str(max(nums))


def _nth_word(rng):
    words = rng.sample(WORDS, 4)
    i = rng.randrange(3)
    return f"Words: {' '.join(words)}\nPosition: {ORDINALS[i]}", words[[0, 1, -1][i]]


TASKS: dict[str, LlmTask] = {
    t.name: t
    for t in [
        LlmTask("sentiment", "Sentiment code", _sentiment, ("blue", "red")),
        LlmTask("topic", "Topic code", _topic, tuple(TOPIC_CODES.values())),
        LlmTask("entailment", "Entailment code", _entailment, ("apple", "pear")),
        LlmTask("grammar", "Grammar code", _grammar, ("gold", "silver")),
        LlmTask("largest", "Largest", _largest),
        LlmTask("nth_word", "Word", _nth_word),
    ]
}


def _rng(task: str, split: str, seed: int) -> random.Random:
    return random.Random(f"{task}/{split}/{seed}")


def distinct_examples(task: str, split: str, n: int, seed: int, exclude: set[str] = frozenset(),
                      accept: Callable[[str], bool] = lambda p: True) -> list[tuple[str, str]]:  # fmt: skip
    """n distinct (prompt, answer) pairs of `task`'s split, none of whose prompts is in `exclude`."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    rng, out, seen = _rng(task, split, seed), [], set(exclude)
    for _ in range(200 * n + 1000):
        if len(out) == n:
            return out
        prompt, answer = TASKS[task].example(rng)
        if prompt not in seen and accept(prompt):
            seen.add(prompt)
            out.append((prompt, answer))
    raise ValueError(f"task {task}: only {len(out)} distinct {split} prompts, asked for {n}")


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
        held, rng = self.held_out(task), _rng(task, f"train{seed}", self.sizes.seed)
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


# ---- fine-tuning: experts and LoRA adapters -------------------------------------------------------------


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


# ---- a tiny random base for smoke runs ----------------------------------------


def tiny_vocabulary(tasks: Sequence[str], n: int = 3000) -> list[str]:
    """Every word and punctuation mark the tasks' templates produce (for the smoke run's word tokenizer)."""
    import re

    words: set[str] = set(str(i) for i in range(100))
    for t in tasks:
        rng = _rng(t, "vocab", 0)
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


# ---- diagnostics of the learned merges (issue 10, item 3) -------------------------------------------------


@torch.no_grad()
def teacher_forced_js(merged, expert, suite: LlmSuite, prompts: Sequence[str], max_new_tokens: int,
                      batch_size: int = 64) -> dict:  # fmt: skip
    """JS(expert || merged) at each position of the expert's greedy continuation, teacher-forced, split by
    kind: the first answer token, later answer tokens, and the EOS position. Also the expert's probability
    of its own first token (its confidence). Means over prompts."""
    device = next(merged.parameters()).device
    conts = [[*suite.encode_prompt(p)] for p in prompts]
    gen = greedy_token_ids(expert, suite, prompts, max_new_tokens, batch_size)
    sums = {"first": [0.0, 0], "rest": [0.0, 0], "eos": [0.0, 0]}
    conf = []
    for s in range(0, len(prompts), batch_size):
        seqs, spans = [], []
        for i in range(s, min(s + batch_size, len(prompts))):
            g = gen[i] + ([suite.eos_token_id] if len(gen[i]) < max_new_tokens else [])
            seqs.append(conts[i] + g[:-1] if g else conts[i])
            spans.append((len(conts[i]) - 1, g))
        ids, mask = left_padded(seqs, suite.pad_token_id, device)
        lp = torch.log_softmax(expert(input_ids=ids, attention_mask=mask).logits.float(), -1)
        lq = torch.log_softmax(merged(input_ids=ids, attention_mask=mask).logits.float(), -1)
        S = ids.shape[1]
        for b, (start, g) in enumerate(spans):
            off = S - len(seqs[b])
            for j, tok in enumerate(g):
                pos = off + start + j
                p, q = lp[b, pos].exp(), lq[b, pos].exp()
                m = 0.5 * (p + q)
                js = 0.5 * float((p * (lp[b, pos] - m.log())).sum() + (q * (lq[b, pos] - m.log())).sum())
                kind = "eos" if tok == suite.eos_token_id else ("first" if j == 0 else "rest")
                sums[kind][0] += js
                sums[kind][1] += 1
                if j == 0:
                    conf.append(float(p[tok]))
    out = {f"js_{k}": (v[0] / v[1] if v[1] else float("nan")) for k, v in sums.items()}
    out["n_positions"] = {k: v[1] for k, v in sums.items()}
    out["expert_confidence"] = sum(conf) / max(1, len(conf))
    return out


@torch.no_grad()
def greedy_token_ids(model, suite: LlmSuite, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 256
                     ) -> list[list[int]]:  # fmt: skip
    """Greedy continuation ids (EOS excluded) of each prompt."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=suite.eos_token_id,
                           pad_token_id=suite.pad_token_id)  # fmt: skip
    out = []
    for s in range(0, len(prompts), batch_size):
        ids, mask = left_padded([suite.encode_prompt(p) for p in prompts[s : s + batch_size]], suite.pad_token_id,
                                device)  # fmt: skip
        gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)[:, ids.shape[1] :]
        for row in gen.tolist():
            out.append(row[: row.index(suite.eos_token_id)] if suite.eos_token_id in row else row)
    return out


class InMemoryMerge:
    """theta0 + sum_t c_t tau_t set in place into one model on `device`, for fast searches over coefficients
    (task level: c [T]; layer level: c [T, n_blocks] in blockmerge.io.checkpoint's block order)."""

    def __init__(self, base: Path, experts: Sequence[Path], device: str = "cpu"):
        from blockmerge.io.checkpoint import Checkpoint, block_name

        self.model = load_causal_lm(base, device)
        self.names = [n for n, p in self.model.named_parameters()]
        self.theta0 = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.taus = []
        for e in experts:
            other = load_causal_lm(e, device)
            self.taus.append({n: p.detach() - self.theta0[n] for n, p in other.named_parameters()})
            del other
        blocks = [b.name for b in Checkpoint(base).blocks()]
        self.block_index = {b: i for i, b in enumerate(blocks)}
        self.block_of = {n: self.block_index[block_name(n)] for n in self.names}

    @torch.no_grad()
    def set(self, coefficients) -> None:
        c = torch.as_tensor(coefficients, dtype=torch.float32)
        for n, p in self.model.named_parameters():
            w = self.theta0[n].clone()
            for t, tau in enumerate(self.taus):
                w.add_(tau[n], alpha=float(c[t] if c.dim() == 1 else c[t, self.block_of[n]]))
            p.copy_(w)


def search_task_coefficients(merge: InMemoryMerge, suite: LlmSuite, subset: Sequence[str],
                             expert_acc: dict[str, float], grid: Sequence[float], split: str = "val",
                             batch_size: int = 64) -> list[tuple[tuple[float, ...], float, dict]]:  # fmt: skip
    """ANP on `split` of every task-level coefficient vector in grid^k, best first."""
    import itertools

    out = []
    for c in itertools.product(grid, repeat=len(subset)):
        merge.set(list(c))
        acc = {t: accuracy(merge.model, suite, t, split, batch_size) for t in subset}
        score = sum(acc[t] / expert_acc[t] if expert_acc[t] else 0.0 for t in subset) / len(subset)
        out.append((tuple(c), score, acc))
    return sorted(out, key=lambda r: -r[1])


def learned_coefficients(record: dict, merge: InMemoryMerge) -> torch.Tensor:
    """[T, n_blocks] coefficients of a LearnResult.to_json() record, in `merge`'s block order."""
    c = torch.zeros(len(record["coefficients"]), len(merge.block_index))
    for t, per_block in enumerate(record["coefficients"]):
        for name, v in per_block.items():
            c[t, merge.block_index[name]] = v
    return c


def diagnose_pair(suite: LlmSuite, subset: Sequence[str], records: dict[str, dict], expert_val: dict[str, float],
                  device: str, grid: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25), n_prompts: int = 64,
                  batch_size: int = 256) -> dict:  # fmt: skip
    """Issue 10 item 3 on one subset: the best task-level coefficients by grid search on the validation split,
    each learned merge's coefficients (per task: mean, min, max over blocks), its validation ANP, and the
    teacher-forced JS to each expert split by position kind (first answer token, later tokens, EOS), beside
    the same for the searched optimum and plain task arithmetic (all ones)."""
    merge = InMemoryMerge(suite.base, [suite.expert(t) for t in subset], device)
    search = search_task_coefficients(merge, suite, subset, expert_val, grid, "val", batch_size)
    experts = {t: load_causal_lm(suite.expert(t), device) for t in subset}
    prompts = {t: suite.unlabeled(t, n_prompts) for t in subset}

    def probe(coeffs) -> dict:
        merge.set(coeffs)
        acc = {t: accuracy(merge.model, suite, t, "val", batch_size) for t in subset}
        js = {t: teacher_forced_js(merge.model, experts[t], suite, prompts[t], suite.max_new_tokens(t), batch_size)
              for t in subset}  # fmt: skip
        return {"val_acc": acc, "val_anp": sum(acc[t] / max(expert_val[t], 1e-9) for t in subset) / len(subset),
                "js": js}  # fmt: skip

    T = len(subset)
    out = {"subset": list(subset), "grid": list(grid),
           "search_top": [{"coefficients": list(c), "val_anp": s, "val_acc": a} for c, s, a in search[:5]],
           "search_best": probe(list(search[0][0])), "task_arithmetic_1": probe([1.0] * T), "learned": {}}  # fmt: skip
    for method, rec in records.items():
        c = learned_coefficients(rec, merge)
        tail = rec["losses"][-10:]
        out["learned"][method] = {
            "coef_mean": c.mean(1).tolist(), "coef_min": c.min(1).values.tolist(), "coef_max": c.max(1).values.tolist(),
            "loss_first": rec["losses"][0], "loss_last": sum(tail) / len(tail), "losses": rec["losses"],
            **probe(c),
        }  # fmt: skip
    return out
