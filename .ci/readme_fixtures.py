"""Stand-ins for what the README's GPT-2 example expects the user to bring, made small:

    python .ci/readme_fixtures.py WORKDIR

- WORKDIR/hf/gpt2: a Hugging Face GPT-2 directory (config.json + model.safetensors) written by
  transformers itself from a GPT2Config with GPT-2's vocabulary and context (50257, 1024) but 2
  layers of width 32, random weights: the same files `save_pretrained` writes for the real one;
- WORKDIR/data/openwebtext/{train,val}.bin: uint16 ids below 50257 in nanoGPT's format.
Needs transformers (the dev extra).
"""
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel


def main(work: Path) -> None:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(work / "hf" / "gpt2")
    data = work / "data" / "openwebtext"
    data.mkdir(parents=True, exist_ok=True)
    ids = np.random.default_rng(0).integers(0, 50257, size=300_000, dtype=np.uint16)
    ids[:250_000].tofile(data / "train.bin")
    ids[250_000:].tofile(data / "val.bin")
    print(f"fixtures: a 2-layer GPT-2 (random weights) in {work / 'hf' / 'gpt2'}, token files in {data}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
