"""Sample from a trained model: a checkpoint, an export or a Hugging Face (GPT-2, Llama, Qwen2)
directory, in one process or K pipeline stages. Nothing is trained or written.

    python -m minipipe.generate out/ckpt --prompt "def " --tokens 200
    torchrun --standalone --nproc_per_node=2 -m minipipe.generate out/model --prompt "import " --tokens 100

The prompt is UTF-8 bytes for a byte-level model (vocab <= 256), else token ids separated by
spaces. Sampling is train.py --sample's (minipipe.pipeline.generation: top-k, temperature, a
generator seeded by --seed), so the same weights and seed print the same text at any K.
"""
import argparse
import os
import sys

import torch

from minipipe.errors import ConfigError
from minipipe.inference import decode, encode, open_run, run_command
from minipipe.models import registry


def generate_text(source, prompt: str, tokens: int, temperature: float = 0.8, top_k: int = 40,
                  seed: int | None = None) -> str:
    """The prompt and its continuation, decoded (on every rank)."""
    if tokens < 1 or temperature <= 0 or top_k < 1:
        raise ConfigError(f"need --tokens >= 1, --temperature > 0 and --top-k >= 1 (got {tokens}, "
                          f"{temperature}, {top_k})")
    run = open_run(source)
    cfg = run.cfg
    if registry.family(cfg).unit != "token":
        raise ConfigError(f"{source} holds a {cfg.model}, which does not predict tokens: generation "
                          f"needs a language model")
    ids = encode(prompt, cfg.vocab)
    new = run.engine.generate(torch.tensor([ids]), tokens, cfg.max_seq_len, temperature, top_k,
                              seed=cfg.seed if seed is None else seed)
    return decode(ids + new.tolist(), cfg.vocab)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="sample from a checkpoint or an export; trains nothing")
    parser.add_argument("source", help="a --ckpt-dir, a step-N directory, an export or a Hugging Face "
                        "(GPT-2, Llama, Qwen2) directory")
    parser.add_argument("--prompt", required=True, help="text (byte-level models) or token ids")
    parser.add_argument("--tokens", type=int, default=200, help="how many tokens to sample")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--seed", type=int, help="sampling seed (default: the run's --seed)")
    args = parser.parse_args(argv)

    def body():
        text = generate_text(args.source, args.prompt, args.tokens, args.temperature, args.top_k, args.seed)
        if int(os.environ.get("RANK", "0")) == 0:
            print(text, flush=True)
    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
