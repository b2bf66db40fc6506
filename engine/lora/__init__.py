"""LoRA adapters: the PEFT adapter format (adapter), adapter merges with PEFT semantics (merge), merging into
the base (into_base), extraction from a fine-tune (extract), DivMerge over adapters with an optionally quantised
base (learn), and the `blockmerge lora` command (cli)."""
