"""Reading a checkpoint's files, verified: the layout's names, trainer_state.json, the indexes and
the tensors, each file checked against the size and sha256 recorded at save time before it is
opened. Only JSON and safetensors are read: nothing is unpickled. Shared by checkpoint.py
(resume) and export.py.

Every file is opened through `file_inside`: a name from `latest`, trainer_state.json or an index
that is absolute, climbs out with `..`, or is a symlink leading out of the named directory is
refused naming the entry. trainer_state.json has no checksum of its own, so its schema is checked
field by field (`check_trainer_state`) before any value is used: an edited one can change what a
resume does with files inside the checkpoint (step, data position, RNG, which recorded shard a
name maps to, in which case the sha256 of that shard must match too), but it cannot make minipipe
read a file outside the directory, load a tensor of another shape or dtype, or train from a
negative step.
"""
import base64
import binascii
import hashlib
import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from minipipe.errors import CheckpointError

FORMAT_VERSION = 1
MODEL_SHAPE_FIELDS = ("model", "layers", "d_model", "heads", "max_seq_len", "vocab", "cells",
                      "filters", "image_size", "classes", "channels", "tie_embeddings")
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
# Every name a save writes into a step directory: the only files minipipe ever deletes there.
WRITTEN_FILE = re.compile(r"((model|optimizer)-\d{5}-of-\d{5}\.safetensors|"
                          r"(model|optimizer)\.safetensors\.index\.json|trainer_state\.json)$")


SHA256 = re.compile(r"[0-9a-f]{64}$")
# safetensors' names of the dtypes a checkpoint stores its floating-point tensors in, by --dtype
# (float16 and bfloat16 train with float32 master weights: build.PARAM_DTYPES)
SAVED_FLOAT_DTYPES = {"float32": "F32", "float64": "F64", "bfloat16": "F32", "float16": "F32"}


def file_inside(directory: Path, name, error=CheckpointError, named_by: str = "") -> Path:
    """directory/name, if it is a plain relative name that stays inside directory once every
    symlink is resolved; else `error` naming the entry (named_by: the file that holds it)."""
    where = f" (named by {named_by})" if named_by else ""
    if not isinstance(name, str) or not name or "\0" in name:
        raise error(f"{directory}: file entry {name!r}{where} is not a file name")
    path = directory / name
    root = directory.resolve()
    if Path(name).is_absolute() or not path.resolve().is_relative_to(root):
        raise error(f"{directory}: file entry {name!r}{where} lies outside {directory}; only files "
                    f"inside the directory are read (an absolute path, `..` or a symlink out is "
                    f"refused)")
    return path


def checkpoint_path(path) -> Path:
    """A step directory as given, or the one a checkpoint directory's `latest` names."""
    path = Path(path)
    if (path / LATEST).is_file():
        with open(file_inside(path, LATEST), "rb") as fh:  # a step name: a few bytes, never more
            name = fh.read(256).decode(errors="replace").strip()
        if not STEP_DIR.match(name):
            raise CheckpointError(f"{path / LATEST} names {name[:80]!r}, not a step-N directory: "
                                  f"the file is corrupt; pass a step directory (--resume PATH)")
        path = file_inside(path, name, named_by=LATEST)
    if not file_inside(path, TRAINER_STATE).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {TRAINER_STATE}); pass a "
                              f"step-N directory or a --ckpt-dir holding `{LATEST}`, or --resume none")
    return path


def read_trainer_state(path: Path) -> dict:
    file = file_inside(path, TRAINER_STATE)
    try:
        state = json.loads(file.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing: {path} is not a complete checkpoint")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"{file} is not valid JSON ({err}); the checkpoint is corrupt")
    check_trainer_state(state, file)
    return state


def check_trainer_state(state, file: Path) -> None:
    """trainer_state.json's one schema: every field minipipe uses, by type and range."""
    def need(ok: bool, field: str, what: str, value) -> None:
        if not ok:
            raise CheckpointError(f"{file}: {field} must be {what}, not {str(value)[:80]!r}: the "
                                  f"checkpoint is corrupt or was edited; resume from another "
                                  f"checkpoint (--resume PATH) or start fresh (--resume none)")
    need(isinstance(state, dict), "the file", "a JSON object", type(state).__name__)
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: format version {state.get('format_version')!r}, this "
                              f"minipipe reads version {FORMAT_VERSION}")
    absent = [key for key in TRAINER_STATE_KEYS if key not in state]
    if absent:
        raise CheckpointError(f"{file} lacks {', '.join(absent)}: the checkpoint is corrupt")
    need(_count(state["step"]), "step", "an integer >= 0", state["step"])
    need(_number(state.get("lr", 0.0)), "lr", "a finite number", state.get("lr"))
    config = state["config"]
    need(isinstance(config, dict) and all(isinstance(k, str) for k in config), "config",
         "an object of settings", config)
    need(config.get("dtype") in SAVED_FLOAT_DTYPES, "config.dtype",
         f"one of {', '.join(SAVED_FLOAT_DTYPES)}", config.get("dtype"))
    world = state["world"]
    need(isinstance(world, dict) and set(world) == {"stages", "dp"}
         and all(_count(v) and v >= 1 for v in world.values()), "world",
         'an object {"stages": n >= 1, "dp": n >= 1}', world)
    cursor = state["data_cursor"]
    need(isinstance(cursor, dict) and _count(cursor.get("position"))
         and isinstance(cursor.get("dataset"), str), "data_cursor",
         'an object {"position": n >= 0, "dataset": "..."}', cursor)
    scale = state.get("loss_scale", [1.0, 0])
    need(isinstance(scale, list) and len(scale) == 2 and _number(scale[0]) and scale[0] > 0
         and _count(scale[1]), "loss_scale", "[a finite scale > 0, steps >= 0]", scale)
    balance = state.get("balance", [1])
    need(isinstance(balance, list) and balance and all(_count(n) and n >= 1 for n in balance),
         "balance", "a list of layer counts >= 1", balance)
    rng = state["rng"]
    need(isinstance(rng, list) and len(rng) == world["stages"] * world["dp"]
         and all(_rng_state_ok(r) for r in rng), "rng",
         f"one saved RNG state per rank ({world['stages'] * world['dp']})", rng)
    files = state["files"]
    need(isinstance(files, dict), "files", "an object of file records", files)
    for name, record in files.items():
        need(isinstance(name, str) and "/" not in name and name not in ("", ".", ".."),
             "a files entry", "a plain file name", name)
        need(isinstance(record, dict) and isinstance(record.get("sha256"), str)
             and SHA256.match(record["sha256"]) is not None and _count(record.get("bytes")),
             f"files[{name!r}]", 'an object {"sha256": 64 hex digits, "bytes": n >= 0}', record)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


TORCH_RNG_BYTES = torch.get_rng_state().numel()


def _rng_state_ok(saved) -> bool:
    """One rank's RNG record: base64 of a CPU generator state of the right size (a short one
    aborts the process in torch.set_rng_state), and a CUDA one or null."""
    if not (isinstance(saved, dict) and isinstance(saved.get("torch"), str) and "cuda" in saved
            and (saved["cuda"] is None or isinstance(saved["cuda"], str))):
        return False
    try:
        if len(base64.b64decode(saved["torch"], validate=True)) != TORCH_RNG_BYTES:
            return False
        if saved["cuda"] is not None:
            base64.b64decode(saved["cuda"], validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


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
        weight_map = json.loads((path / index_name).read_bytes())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path / index_name} is not a safetensors index ({err})")
    if not (isinstance(weight_map, dict)
            and all(isinstance(v, str) for v in weight_map.values())):
        raise CheckpointError(f"{path / index_name}: weight_map must map tensor names to file "
                              f"names: the index is corrupt")
    return weight_map


def read_tensors(path: Path, kind: str, weight_map: dict, state: dict, wanted: dict) -> dict:
    """The tensors `wanted` (name -> expected shape, or None for any), read lazily from only the
    files that hold them, each file verified against trainer_state.json before it is opened.
    Each tensor must have the dtype the checkpoint's config saves (AdamW's step counts are
    float32 whatever the model's dtype) and hold only finite values: anything else is a corrupt
    or edited file, refused rather than cast."""
    index_name = INDEX_FILES[kind]
    float_dtype = SAVED_FLOAT_DTYPES[state["config"]["dtype"]]
    absent = sorted(set(wanted) - set(weight_map))
    if absent:
        raise CheckpointError(f"{path / index_name} has no tensor {absent[0]} ({len(absent)} "
                              f"missing): the checkpoint belongs to another model")
    by_file = {}
    for name in sorted(wanted):
        by_file.setdefault(weight_map[name], []).append(name)
    tensors = {}
    for file_name, names in sorted(by_file.items()):
        verify_file(path, file_name, state, named_by=index_name)
        try:
            tensors.update(_read_shard(path, file_name, names, index_name, wanted,
                                       {name: "F32" if kind == "optimizer" and name.endswith(".step")
                                        else float_dtype for name in names}))
        except SafetensorError as err:  # a recorded file that is no safetensors file
            raise CheckpointError(f"{path / file_name} is not a readable safetensors file "
                                  f"({err}): the checkpoint is corrupt") from None
    return tensors


def _read_shard(path: Path, file_name: str, names: list, index_name: str, wanted: dict,
                dtypes: dict) -> dict:
    tensors = {}
    with safe_open(file_inside(path, file_name), framework="pt", device="cpu") as shard:
        held = set(shard.keys())
        for name in names:
            if name not in held:
                raise CheckpointError(f"{path / index_name} maps {name} to {file_name}, "
                                      f"which does not hold it: the index is corrupt")
            shape = shard.get_slice(name).get_shape()
            if wanted[name] is not None and shape != list(wanted[name]):
                raise CheckpointError(f"{path / file_name}: {name} has shape {shape}, this "
                                      f"model needs {list(wanted[name])}: another model shape")
            dtype = shard.get_slice(name).get_dtype()
            if dtype != dtypes[name]:
                raise CheckpointError(f"{path / file_name}: {name} is stored as {dtype}, but "
                                      f"this checkpoint saves it as {dtypes[name]}: the file is "
                                      f"corrupt or was edited; resume from another checkpoint")
            tensor = shard.get_tensor(name)
            if not torch.isfinite(tensor).all():
                raise CheckpointError(f"{path / file_name}: {name} holds NaN or infinite "
                                      f"values: the checkpoint is corrupt (saved from a "
                                      f"diverged run?); resume from an earlier checkpoint")
            tensors[name] = tensor
    return tensors


def verify_file(path: Path, file_name: str, state: dict, named_by: str = "") -> None:
    """The file exists inside path with the size and sha256 that trainer_state.json recorded at save time."""
    record = state["files"].get(file_name)
    file = file_inside(path, file_name, named_by=named_by)
    if record is None:
        raise CheckpointError(f"{file} is named by an index but not recorded in {TRAINER_STATE}: "
                              f"the checkpoint is inconsistent")
    if not file.is_file():  # (a FIFO or a device is not a file either: never opened)
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
