"""Weights on disk: sharded safetensors checkpoints (checkpointer: save, resume, re-shard), their
verified files (files), the one-run-per-directory claim (directory), and Hugging Face model
directories for --init-from and exports (hf_format; names and layouts per family: hf_gpt2,
hf_llama)."""
