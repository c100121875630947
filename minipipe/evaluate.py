"""Validation loss (and perplexity, for a language model) of a trained model: a checkpoint, an
export or a Hugging Face (GPT-2, Llama, Qwen2) directory, in one process or K pipeline stages.
Nothing is trained or written.

    python -m minipipe.evaluate out/ckpt                           # the data it was trained on
    torchrun --standalone --nproc_per_node=2 -m minipipe.evaluate out/ckpt --data notes.txt --batches 8

The loss is training's validation (minipipe.pipeline.evaluation): the mean over every token (or
sample) of --batches batches of the validation split, at the source's --batch-size and --seed,
so a checkpoint's number equals the val_loss its run logged at that step when the data and the
batch count are the same.
"""
import argparse
import math
import os
import sys

from minipipe.errors import ConfigError
from minipipe.inference import open_run, run_command
from minipipe.models import registry


def validation_loss(source, data: str | None = None, batches: int | None = None) -> tuple:
    """(mean loss, the run's Config) on every rank."""
    if batches is not None and batches < 1:
        raise ConfigError(f"--batches must be >= 1 (got {batches})")
    run = open_run(source, data=data, eval_batches=batches)
    cfg = run.cfg
    loss = run.engine.evaluate(run.dataset.batch(i, cfg.batch_size, split="val")
                               for i in range(cfg.eval_batches))
    return loss, cfg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="validation loss of a checkpoint or an export; trains nothing")
    parser.add_argument("source", help="a --ckpt-dir, a step-N directory, an export or a Hugging Face "
                        "(GPT-2, Llama, Qwen2) directory")
    parser.add_argument("--data", help="train.py's --data (default: the data the source was trained on)")
    parser.add_argument("--batches", type=int, help="validation batches (default: the source's --eval-batches)")
    args = parser.parse_args(argv)

    def body():
        loss, cfg = validation_loss(args.source, args.data, args.batches)
        if int(os.environ.get("RANK", "0")) == 0:
            unit = registry.family(cfg).unit
            perplexity = f", perplexity {math.exp(loss):.3f}" if unit == "token" else ""
            print(f"val loss {loss:.4f}{perplexity} ({cfg.eval_batches} batches of {cfg.batch_size} "
                  f"from the validation split of {cfg.data or 'the default data'})", flush=True)
    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
