"""Stand-ins for what the README's fine-tuning examples expect the user to bring, made small:

    python .ci/readme_fixtures.py WORKDIR

- WORKDIR/hf/gpt2: a Hugging Face GPT-2 directory (config.json + model.safetensors) written by
  transformers itself from a GPT2Config with GPT-2's vocabulary and context (50257, 1024) but 2
  layers of width 32, random weights: the same files `save_pretrained` writes for the real one;
- WORKDIR/data/openwebtext/{train,val}.bin: uint16 ids below 50257 in nanoGPT's format;
- WORKDIR/hf/smollm2: a LlamaForCausalLM directory with SmolLM2-135M's vocabulary (49152), tied
  head, grouped-query attention (4 heads over 2 key/value heads), 2 layers of width 32;
- WORKDIR/data/smollm2/{train,val}.bin: uint32 ids below 49152.
Needs transformers (the dev extra).
"""
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def token_files(folder: Path, vocab: int, dtype) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ids = np.random.default_rng(0).integers(0, vocab, size=300_000).astype(dtype)
    ids[:250_000].tofile(folder / "train.bin")
    ids[250_000:].tofile(folder / "val.bin")


def main(work: Path) -> None:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(work / "hf" / "gpt2")
    token_files(work / "data" / "openwebtext", 50257, np.uint16)
    llama = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                        rope_theta=100000.0, tie_word_embeddings=True)
    LlamaForCausalLM(llama).save_pretrained(work / "hf" / "smollm2")
    token_files(work / "data" / "smollm2", 49152, np.uint32)
    print(f"fixtures: a 2-layer GPT-2 and a 2-layer Llama (random weights) in {work / 'hf'}, "
          f"token files in {work / 'data'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
