"""The one table of dtypes and the device check: names users write (YAML `dtype:`, `--dtype`), the
safetensors header codes, and where tensors may live."""

from __future__ import annotations

import torch

# safetensors header code -> torch dtype (the ones a checkpoint of an LLM holds)
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# what a user may write for an output dtype (mergekit's spellings and torch's)
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
DTYPE_CHOICES = ("float32", "float16", "bfloat16", "fp32", "fp16", "bf16")  # listed in --help


def parse_dtype(name: str | torch.dtype | None, field: str = "dtype") -> torch.dtype | None:
    """A user's dtype name (or a torch dtype, or None = keep the input's) as a torch dtype."""
    if name is None or isinstance(name, torch.dtype):
        return name
    d = DTYPES.get(str(name).lower().removeprefix("torch."))
    if d is None:
        raise ValueError(f"{field} {name!r}: expected one of {', '.join(sorted(DTYPES))}")
    return d


def parse_device(device: str | torch.device | None) -> torch.device:
    """cpu (default), cuda or cuda:N, checked against what this machine has."""
    if device is None:
        return torch.device("cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r}: not a device (expected cpu, cuda or cuda:N)") from None
    if d.type == "cpu":
        return d
    if d.type != "cuda":
        raise ValueError(f"device {device!r}: not supported (expected cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine (use cpu)")
    if d.index is not None and d.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return d
