"""Reading a checkpoint's files, verified: the layout's names, trainer_state.json, the indexes and
the tensors, each file checked against the size and sha256 recorded at save time before it is
opened. Only JSON and safetensors are read: nothing is unpickled. Shared by checkpoint.py
(resume) and export.py.
"""
import hashlib
import json
import re
from pathlib import Path

from safetensors import safe_open

from minipipe.errors import CheckpointError

FORMAT_VERSION = 1
MODEL_SHAPE_FIELDS = ("model", "layers", "d_model", "heads", "max_seq_len", "vocab", "cells",
                      "filters", "image_size", "classes", "channels", "tie_embeddings",
                      "kv_heads", "ffn_dim", "rope_theta", "norm_eps", "attention_bias")
SHAPE_FIELD_DEFAULTS = {"tie_embeddings": False}  # what a checkpoint saved before the field means
# The data order: batch s is a function of (seed, s, batch size, seq_len); resuming under other
# values would skip or repeat samples, so they must match (dp and M split a batch, order kept).
DATA_ORDER_FIELDS = ("seed", "batch_size", "seq_len")
INDEX_FILES = {"model": "model.safetensors.index.json",
               "optimizer": "optimizer.safetensors.index.json"}
TRAINER_STATE = "trainer_state.json"
TRAINER_STATE_KEYS = ("step", "config", "world", "data_cursor", "rng", "files")
LATEST = "latest"
STEP_DIR = re.compile(r"step-(\d+)$")


def checkpoint_path(path) -> Path:
    """A step directory as given, or the one a checkpoint directory's `latest` names."""
    path = Path(path)
    if (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    if not (path / TRAINER_STATE).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {TRAINER_STATE}); pass a "
                              f"step-N directory or a --ckpt-dir holding `{LATEST}`, or --resume none")
    return path


def read_trainer_state(path: Path) -> dict:
    file = path / TRAINER_STATE
    try:
        state = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing: {path} is not a complete checkpoint")
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file} is not valid JSON ({err}); the checkpoint is corrupt")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: format version {state.get('format_version')!r}, this "
                              f"minipipe reads version {FORMAT_VERSION}")
    absent = [key for key in TRAINER_STATE_KEYS if key not in state]
    if absent:
        raise CheckpointError(f"{file} lacks {', '.join(absent)}: the checkpoint is corrupt")
    return state


def check_model_shape(state: dict, cfg, path: Path) -> None:
    saved = state["config"]
    differ = [f"{name}={saved.get(name, SHAPE_FIELD_DEFAULTS.get(name))} (this run: {getattr(cfg, name)})"
              for name in MODEL_SHAPE_FIELDS
              if saved.get(name, SHAPE_FIELD_DEFAULTS.get(name)) != getattr(cfg, name)]
    if differ:
        raise CheckpointError(f"{path} holds another model: {', '.join(differ)}; pass the "
                              f"checkpoint's model flags, or start fresh with --resume none")


def check_data_order(state: dict, cfg, path: Path) -> None:
    saved = state["config"]
    differ = [f"--{name.replace('_', '-')} {saved.get(name)} (this run: {getattr(cfg, name)})"
              for name in DATA_ORDER_FIELDS if saved.get(name) != getattr(cfg, name)]
    if differ:
        raise CheckpointError(f"{path} was trained with {', '.join(differ)}, which set the data "
                              f"order: resuming would skip or repeat samples; pass the "
                              f"checkpoint's values, or start fresh with --resume none")


def read_index(path: Path, kind: str, state: dict) -> dict:
    """The weight_map (name -> file) of the `kind` index, after checking the index file itself."""
    index_name = INDEX_FILES[kind]
    verify_file(path, index_name, state)
    try:
        return json.loads((path / index_name).read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"{path / index_name} is not a safetensors index ({err})")


def read_tensors(path: Path, kind: str, weight_map: dict, state: dict, wanted: dict) -> dict:
    """The tensors `wanted` (name -> expected shape, or None for any), read lazily from only the
    files that hold them, each file verified against trainer_state.json before it is opened."""
    index_name = INDEX_FILES[kind]
    absent = sorted(set(wanted) - set(weight_map))
    if absent:
        raise CheckpointError(f"{path / index_name} has no tensor {absent[0]} ({len(absent)} "
                              f"missing): the checkpoint belongs to another model")
    by_file = {}
    for name in sorted(wanted):
        by_file.setdefault(weight_map[name], []).append(name)
    tensors = {}
    for file_name, names in sorted(by_file.items()):
        verify_file(path, file_name, state)
        with safe_open(path / file_name, framework="pt", device="cpu") as shard:
            held = set(shard.keys())
            for name in names:
                if name not in held:
                    raise CheckpointError(f"{path / index_name} maps {name} to {file_name}, "
                                          f"which does not hold it: the index is corrupt")
                shape = shard.get_slice(name).get_shape()
                if wanted[name] is not None and shape != list(wanted[name]):
                    raise CheckpointError(f"{path / file_name}: {name} has shape {shape}, this "
                                          f"model needs {list(wanted[name])}: another model shape")
                tensors[name] = shard.get_tensor(name)
    return tensors


def verify_file(path: Path, file_name: str, state: dict) -> None:
    """The file exists with the size and sha256 that trainer_state.json recorded at save time."""
    record = state["files"].get(file_name)
    file = path / file_name
    if record is None:
        raise CheckpointError(f"{file} is named by an index but not recorded in {TRAINER_STATE}: "
                              f"the checkpoint is inconsistent")
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: the checkpoint is incomplete; resume from "
                              f"another one (--resume PATH) or start fresh (--resume none)")
    size = file.stat().st_size
    if size != record["bytes"]:
        raise CheckpointError(f"{file} is {size} bytes but was saved with {record['bytes']}: "
                              f"truncated or overwritten; resume from another checkpoint")
    if digest(file)["sha256"] != record["sha256"]:
        raise CheckpointError(f"{file}: sha256 mismatch with {TRAINER_STATE}: the file is "
                              f"corrupt; resume from another checkpoint")


def digest(path: Path) -> dict:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            sha.update(chunk)
    return {"sha256": sha.hexdigest(), "bytes": path.stat().st_size}
