"""Hugging Face model directories in and out, for every family that has a converter: what the
families share. Only JSON and safetensors are read or written (transformers is not needed).

    import:  train.py --model M --init-from DIR   DIR = config.json + model.safetensors (or a
                                                  sharded model.safetensors.index.json and its files)
    export:  python -m minipipe.export CKPT OUT --format hf

A converter (hf_gpt2 for the Transformer, hf_llama for Llama) is a module of plain functions and
data:
    NAME, MODEL_TYPES               its name in messages; the config.json model_type values it reads
    SHAPE_KEYS                      Config field -> config.json key of every required size (checked
                                    here: an integer in 1..MAX_SHAPE)
    BLOCK_PREFIX, FIRST_BLOCK_TENSOR  block b's tensors are named BLOCK_PREFIX + "b." + ...
    read_config(config, refuse)     {Config field: (value, config.json key)}, the rest of the one
                                    schema of its config.json checked by type and range; a value
                                    minipipe does not compute exactly is refuse(key, what)
    size_claims(config)             {HF tensor name: (what, claimed shape)} checked against the
                                    safetensors headers before any model is built
    export_config(cfg)              config.json for a minipipe config
    layer_names(cfg, index)         layer `index`'s parameters: minipipe name -> (HF name, transposed)
    canonical(name)                 a file's tensor name -> the name layer_names uses (or None to skip)
Everything else is here, once: every file opened through the containment check
(minipipe/checkpoint/files.py: file_inside), the JSON and the shapes of config.json checked before
a value is used, the sizes checked against the weights' headers, which files hold a stage's
tensors, checks of every name, shape, dtype and finite value, agreement of every rank (through
minipipe/pipeline/collectives.py), the tied weight written once.
"""
import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minipipe.checkpoint import hf_gpt2, hf_llama
from minipipe.checkpoint.files import file_inside
from minipipe.errors import HFModelError
from minipipe.pipeline.collectives import raise_first

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
CONVERTERS = {"transformer": hf_gpt2, "llama": hf_llama}  # family -> its converter
# The largest shape field a config.json may set: beyond it the model cannot be allocated anyway,
# and Python ints that large would reach torch as overflows, not as a message.
MAX_SHAPE = 1 << 24

__all__ = ["HFModelError", "CONVERTERS", "family_of", "config_values", "read_stage_weights", "load_into_stage",
           "write_hf", "export_tensors"]


def family_of(model_type) -> str | None:
    """The --model whose converter reads config.json's model_type, or None."""
    return next((family for family, convert in CONVERTERS.items() if model_type in convert.MODEL_TYPES), None)


def converter(cfg, what: str):
    if cfg.model not in CONVERTERS:
        raise HFModelError(f"{what} converts {' and '.join(CONVERTERS)} models to and from Hugging "
                           f"Face; --model is {cfg.model!r}")
    return CONVERTERS[cfg.model]


# ---- files -------------------------------------------------------------------------------------
def _file(directory: Path, name: str, named_by: str = "") -> Path:
    """directory/name, inside the directory (symlinks resolved), and a regular file if present:
    a FIFO or a device named config.json would block or never end."""
    path = file_inside(directory, name, HFModelError, named_by)
    if path.exists() and not path.is_file():
        raise HFModelError(f"--init-from {directory}: {name} is not a regular file")
    return path


def _opened(directory: Path, file: Path):
    """safe_open, with a file that is not safetensors named as such."""
    try:
        return safe_open(file, framework="pt")
    except FileNotFoundError:
        raise HFModelError(f"--init-from {directory}: {file.name} (named by {HF_INDEX}) is missing") from None
    except SafetensorError as err:
        raise HFModelError(f"--init-from {directory}: {file.name} is not a readable safetensors "
                           f"file ({err})") from None


# ---- config ------------------------------------------------------------------------------------
def read_json_config(directory) -> dict:
    """DIR/config.json as a JSON object (through the containment check)."""
    directory = Path(directory)
    file = _file(directory, HF_CONFIG)
    try:
        config = json.loads(file.read_bytes())
    except FileNotFoundError:
        raise HFModelError(f"--init-from {directory}: no {HF_CONFIG}; pass a Hugging Face model "
                           f"directory (config.json + model.safetensors)")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise HFModelError(f"--init-from {directory}: {file} is not valid JSON ({err})")
    if not isinstance(config, dict):
        raise HFModelError(f"--init-from {directory}: {file} holds a JSON {type(config).__name__}, "
                           f"not an object of settings")
    return config


def is_int(value, low: int = 1, high: int = MAX_SHAPE) -> bool:
    """A JSON integer (not a bool) in low..high."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def is_number(value) -> bool:
    """A finite JSON number (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_config(directory, convert, config: dict) -> dict:
    """The one schema of a converter's config.json: {Config field: (value, config.json key)},
    every field minipipe reads checked by type and range, refused unless it describes math
    minipipe computes exactly."""
    def refuse(key, what):
        raise HFModelError(f"--init-from {directory}: {HF_CONFIG} has {key} = {config.get(key)!r}; "
                           f"minipipe imports {convert.NAME} with {what}")
    for key in convert.SHAPE_KEYS.values():
        if not is_int(config.get(key)):
            refuse(key, f"{key} an integer in 1..{MAX_SHAPE}" if key in config else f"{key} set")
    if config.get("model_type") not in convert.MODEL_TYPES:
        refuse("model_type", f"model_type one of {convert.MODEL_TYPES}")
    if not isinstance(config.get("tie_word_embeddings", False), bool):
        refuse("tie_word_embeddings", "tie_word_embeddings true or false")
    return convert.read_config(config, refuse)


def config_values(cfg) -> dict:
    """cfg's model shape (and the tie) from --init-from's config.json; a flag that says otherwise
    is an error naming both values."""
    convert = converter(cfg, "--init-from")
    directory = Path(cfg.init_from)
    config = read_json_config(directory)
    model_type = config.get("model_type")
    owner = family_of(model_type)
    if owner not in (None, cfg.model):
        raise HFModelError(f"--init-from {cfg.init_from}: {HF_CONFIG} has model_type = {model_type!r}, "
                           f"a --model {owner} model; --model is {cfg.model!r}: pass --model {owner}")
    wanted = read_config(directory, convert, config)
    _check_sizes_are_the_weights(directory, convert, config)
    for name, (value, key) in wanted.items():
        given = getattr(cfg, name)
        if given is not None and given != value:
            raise HFModelError(f"--{name.replace('_', '-')} {given} contradicts --init-from "
                               f"{cfg.init_from}: its {HF_CONFIG} has {key} = {value}; drop "
                               f"the flag (the shape comes from the imported model)")
    return {name: value for name, (value, _) in wanted.items()}


def _check_sizes_are_the_weights(directory: Path, convert, config: dict) -> None:
    """The config's sizes are its weights' own (read from the safetensors headers only): a
    config.json claiming 1e9 layers or a width its tensors do not have is refused here, before a
    model of that size is allocated."""
    layers_key = convert.SHAPE_KEYS["layers"]
    n_layers = config[layers_key]
    located = _file_names(directory, convert, n_layers)
    last_block = f"{convert.BLOCK_PREFIX}{n_layers - 1}.{convert.FIRST_BLOCK_TENSOR}"
    if last_block not in located:  # (by name: a stage opens only the files of its own layers)
        raise HFModelError(f"--init-from {directory}: {HF_CONFIG} has {layers_key} = {n_layers}, "
                           f"but the weights hold no {last_block}: the config does not describe "
                           f"these weights")
    for hf_name, (what, claimed) in convert.size_claims(config).items():
        if hf_name not in located:
            raise HFModelError(f"--init-from {directory}: tensor {hf_name} is missing; the weights "
                               f"do not match {HF_CONFIG}")
        file, stored = located[hf_name]
        with _opened(directory, file) as weights:
            held = list(weights.get_slice(stored).get_shape()) if stored in weights.keys() else None  # noqa: SIM118
        if held != claimed:
            raise HFModelError(f"--init-from {directory}: {HF_CONFIG} says {what} = {claimed}, but "
                               f"{hf_name} in {file.name} is {held}: the config does not describe "
                               f"these weights")


# ---- import ------------------------------------------------------------------------------------
def _file_names(directory: Path, convert, n_layers: int) -> dict:
    """Canonical HF name -> (file, name in the file), from the index or the single file. Every
    file named must lie inside the directory; a block beyond the config's layer count is refused
    (its weights would be dropped without a word)."""
    index = _file(directory, HF_INDEX)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as err:
            raise HFModelError(f"--init-from {directory}: {index} is not a safetensors index ({err})")
        if not isinstance(weight_map, dict):
            raise HFModelError(f"--init-from {directory}: {index}'s weight_map is not an object")
        located = {name: (_file(directory, file, HF_INDEX), name) for name, file in weight_map.items()}
    elif _file(directory, HF_WEIGHTS).is_file():
        with _opened(directory, directory / HF_WEIGHTS) as weights:
            located = {name: (directory / HF_WEIGHTS, name) for name in weights.keys()}  # noqa: SIM118
    else:
        raise HFModelError(f"--init-from {directory}: neither {HF_WEIGHTS} nor {HF_INDEX} is there "
                           f"(only safetensors weights are read, never pickles)")
    named = {convert.canonical(name): where for name, where in located.items()}
    named.pop(None, None)
    block = re.compile(re.escape(convert.BLOCK_PREFIX) + r"(\d+)\.")
    blocks = [int(m.group(1)) for m in map(block.match, named) if m]
    if blocks and max(blocks) >= n_layers:
        layers_key = convert.SHAPE_KEYS["layers"]
        raise HFModelError(f"--init-from {directory}: the weights hold block {convert.BLOCK_PREFIX}"
                           f"{max(blocks)}, but {HF_CONFIG} has {layers_key} = {n_layers}: the config "
                           f"does not describe these weights; fix {layers_key}")
    return named


def read_stage_weights(directory, cfg, shapes: dict) -> dict:
    """The tensors of one stage (`shapes`: its global parameter names -> shapes), in minipipe's
    names and layouts. Every name, shape and dtype is checked before any tensor is read, and
    every tensor read is checked to be finite."""
    convert = converter(cfg, "--init-from")
    directory = Path(directory)
    located = _file_names(directory, convert, cfg.layers)
    plan = {}
    for index in sorted({int(name.split(".")[1]) for name in shapes}):
        for name, (hf_name, transposed) in convert.layer_names(cfg, index).items():
            if name in shapes:
                plan[name] = (hf_name, transposed)
    by_file = {}
    for name, (hf_name, transposed) in plan.items():
        if hf_name not in located:
            raise HFModelError(f"--init-from {directory}: tensor {hf_name} is missing (needed for "
                               f"{name}); the weights do not match {HF_CONFIG}")
        by_file.setdefault(located[hf_name][0], []).append(name)
    tensors = {}
    for phase in ("check", "read"):
        for file, names in sorted(by_file.items()):
            if not file.is_file():
                raise HFModelError(f"--init-from {directory}: {file.name} (named by {HF_INDEX}) is missing")
            with _opened(directory, file) as weights:
                for name in names:
                    hf_name, transposed = plan[name]
                    stored = located[hf_name][1]
                    if stored not in weights.keys():  # noqa: SIM118
                        raise HFModelError(f"--init-from {directory}: {HF_INDEX} maps {stored} to "
                                           f"{file.name}, which does not hold it")
                    if phase == "read":
                        tensor = weights.get_tensor(stored)
                        if not torch.isfinite(tensor).all():
                            raise HFModelError(f"--init-from {directory}: tensor {hf_name} holds "
                                               f"NaN or infinite values: the file is corrupt")
                        tensors[name] = tensor.t() if transposed else tensor
                        continue
                    view = weights.get_slice(stored)
                    shape = list(view.get_shape())
                    expected = list(shapes[name])[::-1] if transposed else list(shapes[name])
                    if shape != expected:
                        raise HFModelError(f"--init-from {directory}: tensor {hf_name} has shape "
                                           f"{shape}, {HF_CONFIG} implies {expected}")
                    if view.get_dtype() not in ("F64", "F32", "BF16", "F16"):
                        raise HFModelError(f"--init-from {directory}: tensor {hf_name} has dtype "
                                           f"{view.get_dtype()}, not a floating-point weight")
    return tensors


def load_into_stage(run) -> None:
    """Copy --init-from's weights into this rank's stage. Every rank checks what it reads, and all
    agree on the verdict before any rank copies, so a bad directory fails every rank at once."""
    lay, stage = run.layout, run.stage
    shapes = {name: p.shape for name, p in stage.state_dict(keep_vars=True).items()}
    try:
        tensors, problem = read_stage_weights(run.cfg.init_from, run.cfg, shapes), None
    except HFModelError as err:
        tensors, problem = None, f"rank {lay.rank} (stage {lay.stage}): {err}"
    raise_first(lay, problem, f"every rank to check --init-from {run.cfg.init_from}", HFModelError)
    params = stage.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)  # cast to the run's dtype; a tied K=1 weight is written twice


# ---- export ------------------------------------------------------------------------------------
def export_tensors(cfg, tensors: dict) -> dict:
    """A checkpoint's tensors (global minipipe names; a tied weight once) -> HF's, contiguous."""
    convert, hf = converter(cfg, "--format hf"), {}
    for index in range(cfg.layers + 2):
        for name, (hf_name, transposed) in convert.layer_names(cfg, index).items():
            if hf_name in hf:  # the tied head: the embedding is written once, from layer 0
                continue
            tensor = tensors[name]
            hf[hf_name] = (tensor.t() if transposed else tensor).contiguous()
    return hf


def write_hf(cfg, tensors: dict, out: Path) -> None:
    save_file(export_tensors(cfg, tensors), out / HF_WEIGHTS, metadata={"format": "pt"})
    config = converter(cfg, "--format hf").export_config(cfg)
    (out / HF_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
