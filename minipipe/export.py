"""Consolidate a sharded checkpoint into one `model.safetensors` and its `config.json`.

    python -m minipipe.export out/ckpt exported/              # a --ckpt-dir (its latest) or a step-N
    cfg, model = load_exported("exported/")                  # the whole model as one nn.Sequential
    python -m minipipe.export out/ckpt gpt2/ --format hf      # GPT2LMHeadModel.from_pretrained("gpt2/")

The destination must be new or empty: a non-empty one (say, the GPT-2 directory a fine-tune
started from) is refused unless --overwrite, and then replaced whole: the export is written
beside it and renamed into place, so a reader never sees a mix of old and new files.

Every shard is verified against trainer_state.json (size, sha256) before it is read. The minipipe
format keeps the global names (`layers.7.qkv.weight`; a tied embedding once, as
`layers.0.tokens.weight`); `--format hf` writes GPT-2's names, layouts and config.json
(minipipe/checkpoint/hf_gpt2.py), for a Transformer checkpoint.
"""
import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from minipipe.checkpoint import hf_gpt2
from minipipe.checkpoint.files import (
    checkpoint_path,
    read_index,
    read_tensors,
    read_trainer_state,
)
from minipipe.config import make_config
from minipipe.errors import CheckpointError, MinipipeError
from minipipe.layers import build_layers
from minipipe.models import registry
from minipipe.pipeline import tied
from minipipe.pipeline.spec import PARAM_DTYPES

EXPORTED_WEIGHTS = "model.safetensors"
EXPORTED_CONFIG = "config.json"
FORMATS = ("minipipe", "hf")


def export(checkpoint, out_dir, format: str = "minipipe", overwrite: bool = False) -> Path:
    """Write out_dir/model.safetensors (every tensor of the model) and out_dir/config.json."""
    out = Path(out_dir)
    if not str(out_dir).strip():
        raise CheckpointError("the output directory is empty; give a path")
    path = checkpoint_path(checkpoint)
    _check_destination(out, path, overwrite)
    state = read_trainer_state(path)
    # The weights are all here: the --init-from directory the run started from is not needed.
    config = {**state["config"], "init_from": None}
    if format == "hf" and config.get("model") != "transformer":
        raise CheckpointError(f"{path}: --format hf writes GPT-2, which needs a Transformer "
                              f"checkpoint; this one holds {config.get('model')!r}")
    weight_map = read_index(path, "model", state)
    tensors = read_tensors(path, "model", weight_map, state, dict.fromkeys(weight_map))
    out.parent.mkdir(parents=True, exist_ok=True)
    beside = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(beside, ignore_errors=True)  # (this process's own name: left by nothing else)
    beside.mkdir()
    try:
        if format == "hf":
            hf_gpt2.write_hf(make_config(**config), tensors, beside)
        else:
            save_file(tensors, beside / EXPORTED_WEIGHTS,
                      metadata={"format": "pt", "step": str(state["step"])})
            (beside / EXPORTED_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
        _replace(beside, out)
    except BaseException:
        shutil.rmtree(beside, ignore_errors=True)
        raise
    return out


def _check_destination(out: Path, checkpoint: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} is a file, not a directory; give a directory to export to")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        raise CheckpointError(f"{out} is not empty (it holds {', '.join(held[:3])}"
                              f"{' ...' if len(held) > 3 else ''}); export into a new directory, "
                              f"or pass --overwrite to replace it whole")
    target, source = out.resolve(), checkpoint.resolve()
    if source == target or source.is_relative_to(target) or target.is_relative_to(source):
        raise CheckpointError(f"{out} is (or holds, or lies in) the checkpoint {checkpoint}; "
                              f"export to a directory outside it")


def _replace(new: Path, out: Path) -> None:
    """Put the finished export at `out`: a rename over nothing or an empty directory is atomic;
    a non-empty one (--overwrite) is renamed aside first and removed once the new one is there."""
    if out.is_dir() and any(out.iterdir()):
        old = out.parent / f".{out.name}.replaced-{os.getpid()}"
        out.rename(old)
        new.rename(out)
        shutil.rmtree(old)
    else:
        os.replace(new, out)


def load_exported(path) -> tuple:
    """(Config, nn.Sequential of every layer) from an `export` directory, for inference or
    analysis on one device: element i is global layer i, with its trained weights and buffers,
    in eval mode."""
    directory = Path(path)
    cfg = make_config(**{**json.loads((directory / EXPORTED_CONFIG).read_text()), "init_from": None})
    layers = build_layers(cfg, range(len(registry.layer_factories(cfg))))
    model = nn.Sequential(*layers.values()).to(PARAM_DTYPES[cfg.dtype])
    tensors = tied.with_copy(registry.tied_weight(cfg), load_file(directory / EXPORTED_WEIGHTS))  # a tied weight is stored once
    model.load_state_dict({name.removeprefix("layers."): t for name, t in tensors.items()})
    return cfg, model.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="one model.safetensors + config.json from a checkpoint")
    parser.add_argument("checkpoint", help="a --ckpt-dir (its latest checkpoint) or a step-N directory")
    parser.add_argument("out_dir", help="where to write model.safetensors and config.json")
    parser.add_argument("--format", choices=FORMATS, default="minipipe",
                        help="minipipe (minipipe.export.load_exported) or hf (transformers' GPT-2)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty out_dir whole (default: refuse it)")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out_dir, args.format, args.overwrite)
    except MinipipeError as err:
        print(f"minipipe error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out / EXPORTED_WEIGHTS} and {out / EXPORTED_CONFIG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
