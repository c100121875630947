"""Hugging Face model directories in and out, for every family that has a converter: what the
families share. Only JSON and safetensors are read or written (transformers is not needed).

    import:  train.py --model M --init-from DIR   DIR = config.json + model.safetensors (or a
                                                  sharded model.safetensors.index.json and its files)
    export:  python -m minipipe.export CKPT OUT --format hf

A converter (hf_gpt2 for the Transformer, hf_llama for Llama) is a module of plain functions and
its MODEL_TYPES (the config.json model_type values it reads):
    read_config(directory, config)  the config.json, refused by name unless minipipe computes
                                    exactly that model; returns {Config field: value}
    export_config(cfg)              config.json for a minipipe config
    layer_names(cfg, index)         layer `index`'s parameters: minipipe name -> (HF name, transposed)
    canonical(name)                 a file's tensor name -> the name layer_names uses (or None to skip)
Everything else (which files hold a stage's tensors, checks before any read, agreement of every
rank, the tied weight written once) is here, once.
"""
import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from minipipe.checkpoint import hf_gpt2, hf_llama
from minipipe.errors import HFModelError

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
CONVERTERS = {"transformer": hf_gpt2, "llama": hf_llama}  # family -> its converter


def converter(cfg, what: str):
    if cfg.model not in CONVERTERS:
        raise HFModelError(f"{what} converts {' and '.join(CONVERTERS)} models to and from Hugging "
                           f"Face; --model is {cfg.model!r}")
    return CONVERTERS[cfg.model]


# ---- config ------------------------------------------------------------------------------------
def read_json_config(directory) -> dict:
    file = Path(directory) / HF_CONFIG
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise HFModelError(f"--init-from {directory}: no {HF_CONFIG}; pass a Hugging Face model "
                           f"directory (config.json + model.safetensors)")
    except json.JSONDecodeError as err:
        raise HFModelError(f"--init-from {directory}: {file} is not valid JSON ({err})")


def apply_config(cfg) -> None:
    """Fill cfg's model shape (and the tie) from --init-from's config.json; a flag that says
    otherwise is an error naming both values."""
    convert, config = converter(cfg, "--init-from"), read_json_config(cfg.init_from)
    model_type = config.get("model_type")
    owner = next((family for family, other in CONVERTERS.items() if model_type in other.MODEL_TYPES), None)
    if owner not in (None, cfg.model):
        raise HFModelError(f"--init-from {cfg.init_from}: {HF_CONFIG} has model_type = {model_type!r}, "
                           f"a --model {owner} model; --model is {cfg.model!r}: pass --model {owner}")
    wanted = convert.read_config(cfg.init_from, config)
    for name, (value, key) in wanted.items():
        given = getattr(cfg, name)
        if given is not None and given != value:
            raise HFModelError(f"--{name.replace('_', '-')} {given} contradicts --init-from "
                               f"{cfg.init_from}: its {HF_CONFIG} has {key} = {value}; drop "
                               f"the flag (the shape comes from the imported model)")
        setattr(cfg, name, value)


# ---- import ------------------------------------------------------------------------------------
def _file_names(directory: Path, canonical) -> dict:
    """Canonical HF name -> (file, name in the file), from the index or the single file."""
    index = directory / HF_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise HFModelError(f"--init-from {directory}: {index} is not a safetensors index ({err})")
        located = {name: (directory / file, name) for name, file in weight_map.items()}
    elif (directory / HF_WEIGHTS).is_file():
        with safe_open(directory / HF_WEIGHTS, framework="pt") as weights:
            located = {name: (directory / HF_WEIGHTS, name) for name in weights.keys()}
    else:
        raise HFModelError(f"--init-from {directory}: neither {HF_WEIGHTS} nor {HF_INDEX} is there "
                           f"(only safetensors weights are read, never pickles)")
    named = {canonical(name): where for name, where in located.items()}
    named.pop(None, None)
    return named


def read_stage_weights(directory, cfg, shapes: dict) -> dict:
    """The tensors of one stage (`shapes`: its global parameter names -> shapes), in minipipe's
    names and layouts. Every name, shape and dtype is checked before any tensor is read."""
    convert = converter(cfg, "--init-from")
    directory = Path(directory)
    located = _file_names(directory, convert.canonical)
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
            with safe_open(file, framework="pt") as weights:
                for name in names:
                    hf_name, transposed = plan[name]
                    stored = located[hf_name][1]
                    if phase == "read":
                        tensor = weights.get_tensor(stored)
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
    problems = [problem]
    if lay.world_size > 1:
        problems = [None] * lay.world_size
        dist.all_gather_object(problems, problem)
    first = next((p for p in problems if p), None)
    if first:
        raise HFModelError(first)
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
