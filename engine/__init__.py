"""blockmerge: memory-efficient merging of LLMs and LoRA adapters."""

__version__ = "0.1.0"
