"""Reading and writing checkpoints: safetensors and GGUF input, block streaming with a memory budget,
the sharded writer and the output-commit protocol, dtypes and devices, progress reporting."""
