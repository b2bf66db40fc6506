"""DivMerge settings: one pydantic model that the YAML of `blockmerge divmerge` / `blockmerge lora divmerge`
is parsed into and that the Python API validates its keyword overrides into; the YAML's paths and prompts.

Paths in a YAML are absolute, relative to the working directory, or relative to the YAML's folder. Data
files are .jsonl with one prompt per line: {"text": ...} (tokenized with the base model's tokenizer) or
{"input_ids": [...]}."""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import torch
import yaml
from blockmerge.io.stream import parse_memory
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator


class LearnSettings(BaseModel):
    """What DivMerge learns and how: shared by full task vectors and LoRA adapters."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)
    level: Literal["task", "layer"] = "layer"
    objective: Literal["js", "kl", "entropy"] = "js"
    steps: int | None = Field(default=None, ge=1)  # default 100 unless epochs is given
    epochs: float | None = Field(default=None, gt=0)
    batch_size: int = Field(default=16, ge=1)
    samples: int | None = Field(default=None, ge=1)  # prompts per task (first N lines); default all
    max_new_tokens: int = Field(default=16, ge=1)
    eos_token_id: int | None = None
    lr: float = Field(default=1e-2, gt=0)
    init: float | None = None  # default 1/T (0.3 for the entropy objective)
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

    @field_validator("cache_dir", mode="before")
    @classmethod
    def _path(cls, v):
        return os.fspath(v) if isinstance(v, os.PathLike) else v

    def n_steps(self) -> int | None:
        """Steps to run: `steps`, else None when `epochs` sets them, else 100."""
        return self.steps if self.steps is not None or self.epochs is not None else 100


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    data: str


def nonempty(what: str) -> AfterValidator:
    """A YAML list of entries: at least one."""

    def check(v: list) -> list:
        if not v:
            raise ValueError(f"at least one {what} is needed")
        return v

    return AfterValidator(check)


class DivMergeConfig(LearnSettings):
    """`blockmerge divmerge` YAML: the settings, the base and the experts with their prompts."""

    base_model: str
    models: Annotated[list[ModelEntry], nonempty("model")]


def validated(schema: type[LearnSettings], raw: dict, where: str) -> LearnSettings:
    """`raw` validated as `schema`; a bad value is one line naming `where` and the field."""
    try:
        cfg = schema.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        raise ValueError(f"{where}: field {loc}: {err['msg']}") from None
    if cfg.steps is not None and cfg.epochs is not None:
        raise ValueError(f"{where}: give steps or epochs, not both")
    return cfg


def with_overrides(settings: LearnSettings | None, schema: type[LearnSettings], overrides: dict) -> LearnSettings:
    """The Python API's settings: `settings` (default: the schema's defaults) with keyword `overrides`,
    validated once."""
    base = {} if settings is None else settings.model_dump(exclude_unset=True)
    if isinstance(settings, schema):
        schema = type(settings)  # a YAML config (settings + inputs) stays one
    return validated(schema, {**base, **overrides}, "settings")


def load_config(path: str | Path | dict, schema: type[LearnSettings], what: str) -> tuple[LearnSettings, Path]:
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
    return validated(schema, raw, where), root


def resolve(p: str, root: Path) -> Path:
    q = Path(p).expanduser()
    if q.is_absolute() or q.exists() or not (root / q).exists():
        return q
    return root / q


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


def input_files(cfg: LearnSettings, root: Path, key: str) -> list[Path]:
    """The data files (and the cache folder) a run reads: OUT may not be one of them."""
    files = [resolve(e.data, root) for e in getattr(cfg, key)]
    return files + ([Path(cfg.cache_dir)] if cfg.cache_dir else [])


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
                    tokenizer = _tokenizer(base_dir, field_name, file)
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


def _tokenizer(base_dir: Path, field_name: str, file: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base_dir)
    except Exception as e:
        why = f"{file} has text but base_model {base_dir} has no usable tokenizer ({e})"
        raise ValueError(f"{field_name}: {why}") from None


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
