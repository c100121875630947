"""Weights on disk: sharded safetensors checkpoints (checkpointer: save, resume, re-shard), their
verified files (files), the one-run-per-directory claim (directory), and Hugging Face GPT-2's
names and layouts (hf_gpt2) for --init-from and exports."""
