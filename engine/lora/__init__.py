"""LoRA adapters: the PEFT adapter format, adapter merges with PEFT semantics, merging into a (quantised)
base, and DivMerge over adapters."""
