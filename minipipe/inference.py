"""A trained model as a forward-only pipeline in this world, for minipipe.generate and
minipipe.evaluate: one process, or K stages (and any cut) under torchrun.

    run = open_run("out/ckpt")                     # a --ckpt-dir (its latest) or a step-N directory
    run = open_run("out/model")                    # a `python -m minipipe.export` directory
    run = open_run("out/gpt2", data="text.txt")    # an --format hf export, or any GPT-2 (or
                                                   # Llama / Qwen2) Hugging Face directory

The run's settings are the source's own (its model, dtype, seed, batch size, micro-batches),
except the layout, which is this world's (stages = world size, dp 1, the default cut), and
everything that would write: no --ckpt-dir, no tracking, no trace. Nothing is trained and
nothing is written. Weights are read as training reads them, each file verified, every rank
agreeing before any copies: a checkpoint through the checkpointer's loader, an export's
model.safetensors by name, a Hugging Face directory through --init-from's importer (minipipe/checkpoint/hf_format.py).
"""
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from safetensors import safe_open

from minipipe.build import build_run
from minipipe.checkpoint.checkpointer import load_checkpoint
from minipipe.checkpoint.files import LATEST, TRAINER_STATE, checkpoint_path, read_trainer_state
from minipipe.checkpoint.hf_format import family_of, load_into_stage
from minipipe.config import make_config
from minipipe.data import DataCursor
from minipipe.errors import CheckpointError, ConfigError, MinipipeError
from minipipe.export import EXPORTED_CONFIG, EXPORTED_WEIGHTS
from minipipe.models import registry
from minipipe.pipeline import tied
from minipipe.pipeline.collectives import raise_first

# The source's layout and outputs give way to this world's, and nothing is saved or logged.
FORWARD_ONLY = dict(stages=None, dp=1, balance=None, balance_by="params", schedule="gpipe",
                    virtual_stages=1, device="auto", ckpt_dir=None, resume="none",
                    overwrite_ckpt=False, wandb="disabled", metrics_jsonl=None, trace=None, sample=0)


def source_kind(source: Path) -> str:
    """'checkpoint', 'export' (minipipe's format) or 'hf' (a Hugging Face directory of a model_type
    a converter reads: GPT-2, Llama, Qwen2)."""
    if (source / LATEST).is_file() or (source / TRAINER_STATE).is_file():
        return "checkpoint"
    if (source / EXPORTED_CONFIG).is_file():
        config = json.loads((source / EXPORTED_CONFIG).read_text())
        return "hf" if isinstance(config, dict) and family_of(config.get("model_type")) else "export"
    raise ConfigError(f"{source} is neither a checkpoint (a --ckpt-dir holding `{LATEST}`, or a "
                      f"step-N directory) nor an export ({EXPORTED_CONFIG} + {EXPORTED_WEIGHTS}); "
                      f"pass one of those")


def open_run(source, **overrides):
    """The Run (minipipe.build) of `source` with its trained weights, in eval mode."""
    source = Path(source)
    kind = source_kind(source)
    if kind == "checkpoint":
        path = checkpoint_path(source)
        values = {**read_trainer_state(path)["config"], "init_from": None}
    elif kind == "export":
        values = {**json.loads((source / EXPORTED_CONFIG).read_text()), "init_from": None}
    else:  # the shape comes from config.json; bytes of text as data unless told otherwise
        model = family_of(json.loads((source / EXPORTED_CONFIG).read_text()).get("model_type"))
        values = {"model": model, "init_from": str(source), "data": "synthetic"}
    cfg = make_config(**{**values, **FORWARD_ONLY, **{k: v for k, v in overrides.items() if v is not None}})
    run = build_run(cfg)
    if kind == "checkpoint":
        load_checkpoint(run, DataCursor(run.dataset, cfg.batch_size), path)
    elif kind == "export":
        _load_exported_stage(run, source / EXPORTED_WEIGHTS)
    else:
        load_into_stage(run)
    run.stage.eval()
    return run


def _load_exported_stage(run, file: Path) -> None:
    """This stage's tensors from an export's one file (a tied head reads the embedding's name)."""
    tie = registry.tied_weight(run.cfg)
    wanted = {name: tied.stored_name(tie, name) for name in run.stage.state_dict()}
    problem, tensors = None, {}
    try:
        with safe_open(file, framework="pt") as weights:
            missing = sorted(set(wanted.values()) - set(weights.keys()))
            if missing:
                raise CheckpointError(f"{file} lacks {missing[:3]} (of {len(missing)} missing); "
                                      f"export the checkpoint again")
            tensors = {name: weights.get_tensor(stored) for name, stored in wanted.items()}
    except (CheckpointError, OSError) as err:
        problem = f"rank {run.layout.rank} (stage {run.layout.stage}): {err}"
    raise_first(run.layout, problem, f"read {file}", CheckpointError)
    run.stage.load_state_dict(tensors)


def decode(ids: list, vocab: int) -> str:
    """Bytes as text for a byte-level model (vocab <= 256), else the token ids."""
    if vocab <= 256:
        return bytes(ids).decode("utf-8", errors="replace")
    return " ".join(map(str, ids))


def encode(text: str, vocab: int) -> list:
    """A prompt: UTF-8 bytes for a byte-level model, else space-separated token ids."""
    if not text:
        raise ConfigError("--prompt is empty: give at least one character (or token id)")
    if vocab <= 256:
        return list(text.encode("utf-8"))
    try:
        ids = [int(part) for part in text.split()]
    except ValueError:
        raise ConfigError(f"--prompt {text!r}: this model's vocabulary has {vocab} tokens, so give "
                          f"the prompt as token ids separated by spaces, e.g. '464 2068'") from None
    if not ids or not all(0 <= i < vocab for i in ids):
        raise ConfigError(f"--prompt {text!r}: give at least one token id, each below {vocab}")
    return ids


def run_command(body) -> int:
    """A command's exit code: `minipipe error: ...` and 2 for bad input (naming the rank when there
    are several), the process group closed either way."""
    try:
        body()
    except MinipipeError as err:
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        print(f"minipipe error: {f'(rank {rank}) ' if world > 1 else ''}{err}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
