"""Hugging Face GPT-2 <-> minipipe's Transformer: the config, and every tensor's name and layout,
both ways. Only JSON and safetensors are read or written (transformers is not needed to run).

    import:  train.py --init-from DIR      DIR = config.json + model.safetensors (or a sharded
                                           model.safetensors.index.json and its files)
    export:  python -m minipipe.export CKPT OUT --format hf

Correspondence (global layer i of [Embedding, Block x L, Head]; GPT-2's Conv1D stores a linear's
weight as (in, out), the transpose of nn.Linear's):
    layers.0.tokens.weight / positions.weight   transformer.wte.weight / wpe.weight
    layers.{b+1}.ln_attn, ln_mlp                transformer.h.{b}.ln_1, ln_2
    layers.{b+1}.qkv                            transformer.h.{b}.attn.c_attn   (T; q, k, v in order)
    layers.{b+1}.attn_proj, fc, mlp_proj        ...attn.c_proj, mlp.c_fc, mlp.c_proj  (T)
    layers.{L+1}.ln                             transformer.ln_f
    layers.{L+1}.proj.weight                    lm_head.weight, or wte when tie_word_embeddings
Files without the `transformer.` prefix (the original hub checkpoints) read the same; GPT-2's
causal-mask buffers (`attn.bias`, `attn.masked_bias`) are not weights and are skipped.
"""
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minipipe.checkpoint.files import file_inside
from minipipe.errors import ConfigError
from minipipe.pipeline.collectives import raise_first

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
# minipipe shape field -> GPT-2 config key
SHAPE_KEYS = {"layers": "n_layer", "d_model": "n_embd", "heads": "n_head",
              "max_seq_len": "n_positions", "vocab": "vocab_size"}
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # both are 0.5 x (1 + tanh(...)), as minipipe's
LAYER_NORM_EPS = 1e-5  # models.transformer.LayerNorm's
BLOCK = {  # Block parameter -> (GPT-2 name under transformer.h.{b}., stored transposed)
    "ln_attn.weight": ("ln_1.weight", False), "ln_attn.bias": ("ln_1.bias", False),
    "qkv.weight": ("attn.c_attn.weight", True), "qkv.bias": ("attn.c_attn.bias", False),
    "attn_proj.weight": ("attn.c_proj.weight", True), "attn_proj.bias": ("attn.c_proj.bias", False),
    "ln_mlp.weight": ("ln_2.weight", False), "ln_mlp.bias": ("ln_2.bias", False),
    "fc.weight": ("mlp.c_fc.weight", True), "fc.bias": ("mlp.c_fc.bias", False),
    "mlp_proj.weight": ("mlp.c_proj.weight", True), "mlp_proj.bias": ("mlp.c_proj.bias", False),
}
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
BLOCK_NAME = re.compile(r"transformer\.h\.(\d+)\.")
# The largest shape field a config.json may set: beyond it the model cannot be allocated anyway,
# and Python ints that large would reach torch as overflows, not as a message.
MAX_SHAPE = 1 << 24


class HFModelError(ConfigError):
    """A Hugging Face directory that is not a GPT-2 minipipe can hold, or whose tensors are wrong."""


# ---- config ------------------------------------------------------------------------------------
def read_config(directory) -> dict:
    """DIR/config.json, refused unless it describes GPT-2 math minipipe computes exactly. The one
    schema of the file: every field minipipe reads is checked by type and range here."""
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

    def refuse(key, what):
        raise HFModelError(f"--init-from {directory}: {HF_CONFIG} has {key} = {config.get(key)!r}; "
                           f"minipipe imports GPT-2 with {what}")
    for key in SHAPE_KEYS.values():
        value = config.get(key)
        if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_SHAPE):
            refuse(key, f"{key} an integer in 1..{MAX_SHAPE}" if key in config else f"{key} set")
    if config.get("model_type") != "gpt2":
        refuse("model_type", "model_type = 'gpt2' only")
    if config.get("activation_function", "gelu_new") not in TANH_GELUS:
        refuse("activation_function", f"activation_function one of {TANH_GELUS}")
    eps = config.get("layer_norm_epsilon", LAYER_NORM_EPS)
    if isinstance(eps, bool) or eps != LAYER_NORM_EPS:
        refuse("layer_norm_epsilon", f"layer_norm_epsilon = {LAYER_NORM_EPS} only")
    n_inner = config.get("n_inner")
    if n_inner is not None and (isinstance(n_inner, bool) or n_inner != 4 * config["n_embd"]):
        refuse("n_inner", f"n_inner null or 4 x n_embd = {4 * config['n_embd']}")
    for key, value in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
        if config.get(key, value) is not value:  # `is`: 1 == True would pass an equality test
            refuse(key, f"{key} = {json.dumps(value)} only")
    if not isinstance(config.get("tie_word_embeddings", True), bool):
        refuse("tie_word_embeddings", "tie_word_embeddings true or false")
    if config["n_embd"] % config["n_head"]:
        refuse("n_embd", f"n_embd divisible by n_head = {config['n_head']}")
    return config


def config_values(cfg) -> dict:
    """cfg's model shape (and the tie) from --init-from's config.json; a flag that says otherwise
    is an error naming both values."""
    if cfg.model != "transformer":
        raise HFModelError(f"--init-from imports a GPT-2 Transformer; --model is {cfg.model!r}")
    config = read_config(cfg.init_from)
    _check_sizes_are_the_weights(Path(cfg.init_from), config)
    wanted = {name: config[key] for name, key in SHAPE_KEYS.items()}
    wanted["tie_embeddings"] = config.get("tie_word_embeddings", True)  # GPT2Config's default
    keys = {**SHAPE_KEYS, "tie_embeddings": "tie_word_embeddings"}
    for name, value in wanted.items():
        given = getattr(cfg, name)
        if given is not None and given != value:
            raise HFModelError(f"--{name.replace('_', '-')} {given} contradicts --init-from "
                               f"{cfg.init_from}: its {HF_CONFIG} has {keys[name]} = {value}; drop "
                               f"the flag (the shape comes from the imported model)")
    return wanted


def _check_sizes_are_the_weights(directory: Path, config: dict) -> None:
    """The config's sizes are its weights' own (read from the safetensors headers only): a
    config.json claiming 1e9 layers or a width its tensors do not have is refused here, before a
    model of that size is allocated."""
    located = _file_names(directory, config["n_layer"])
    last_block = f"transformer.h.{config['n_layer'] - 1}.ln_1.weight"
    if last_block not in located:  # (by name: a stage opens only the files of its own layers)
        raise HFModelError(f"--init-from {directory}: {HF_CONFIG} has n_layer = {config['n_layer']}, "
                           f"but the weights hold no {last_block}: the config does not describe "
                           f"these weights")
    claims = {"transformer.wte.weight": ("vocab_size x n_embd", ["vocab_size", "n_embd"]),
              "transformer.wpe.weight": ("n_positions x n_embd", ["n_positions", "n_embd"])}
    for hf_name, (what, keys) in claims.items():
        claimed = [config[key] for key in keys]
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


GPT2_EOT = 50256  # GPT-2's <|endoftext|>, its bos and eos


def export_config(cfg) -> dict:
    """config.json of GPT2LMHeadModel for a minipipe Transformer config."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab, "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model,
            "n_layer": cfg.layers, "n_head": cfg.heads, "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": LAYER_NORM_EPS,
            "embd_pdrop": cfg.dropout, "resid_pdrop": cfg.dropout,
            "attn_pdrop": 0.0,  # minipipe has no dropout on attention probabilities
            "tie_word_embeddings": bool(cfg.tie_embeddings),
            # GPT2Config's defaults name GPT-2's <|endoftext|> (50256); a smaller vocabulary
            # (bytes) has no such token, and an id past the vocabulary is invalid
            **dict.fromkeys(("bos_token_id", "eos_token_id"), GPT2_EOT if cfg.vocab > GPT2_EOT else None),
            "dtype": "float64" if cfg.dtype == "float64" else "float32"}


# ---- names -------------------------------------------------------------------------------------
def layer_names(cfg, index: int) -> dict:
    """Global layer `index`'s parameters: minipipe name -> (GPT-2 name, stored transposed)."""
    prefix = f"layers.{index}."
    if index == 0:
        return {prefix + "tokens.weight": ("transformer.wte.weight", False),
                prefix + "positions.weight": ("transformer.wpe.weight", False)}
    if index <= cfg.layers:
        return {prefix + name: (f"transformer.h.{index - 1}.{hf}", t) for name, (hf, t) in BLOCK.items()}
    head = "transformer.wte.weight" if cfg.tie_embeddings else "lm_head.weight"
    return {prefix + "ln.weight": ("transformer.ln_f.weight", False),
            prefix + "ln.bias": ("transformer.ln_f.bias", False), prefix + "proj.weight": (head, False)}


def _canonical(name: str) -> str:
    return name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name


def _file(directory: Path, name: str, named_by: str = "") -> Path:
    """directory/name, inside the directory (symlinks resolved), and a regular file if present:
    a FIFO or a device named config.json would block or never end."""
    path = file_inside(directory, name, HFModelError, named_by)
    if path.exists() and not path.is_file():
        raise HFModelError(f"--init-from {directory}: {name} is not a regular file")
    return path


def _file_names(directory: Path, n_layer: int) -> dict:
    """Canonical GPT-2 name -> (file, name in the file), from the index or the single file. Every
    file named must lie inside the directory; a block beyond the config's n_layer is refused
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
    located = {_canonical(name): where for name, where in located.items() if not name.endswith(MASK_BUFFERS)}
    blocks = [int(m.group(1)) for m in map(BLOCK_NAME.match, located) if m]
    if blocks and max(blocks) >= n_layer:
        raise HFModelError(f"--init-from {directory}: the weights hold block transformer.h."
                           f"{max(blocks)}, but {HF_CONFIG} has n_layer = {n_layer}: the config "
                           f"does not describe these weights; fix n_layer")
    return located


def _opened(directory: Path, file: Path):
    """safe_open, with a file that is not safetensors named as such."""
    try:
        return safe_open(file, framework="pt")
    except FileNotFoundError:
        raise HFModelError(f"--init-from {directory}: {file.name} (named by {HF_INDEX}) is missing") from None
    except SafetensorError as err:
        raise HFModelError(f"--init-from {directory}: {file.name} is not a readable safetensors "
                           f"file ({err})") from None


# ---- import ------------------------------------------------------------------------------------
def read_stage_weights(directory, cfg, shapes: dict) -> dict:
    """The tensors of one stage (`shapes`: its global parameter names -> shapes), in minipipe's
    names and layouts. Every name, shape and dtype is checked before any tensor is read."""
    directory = Path(directory)
    located = _file_names(directory, cfg.layers)
    plan = {}
    for index in sorted({int(name.split(".")[1]) for name in shapes}):
        for name, (hf_name, transposed) in layer_names(cfg, index).items():
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
    """A checkpoint's tensors (global minipipe names; a tied weight once) -> GPT-2's, contiguous."""
    hf = {}
    for index in range(cfg.layers + 2):
        for name, (hf_name, transposed) in layer_names(cfg, index).items():
            if hf_name in hf:  # the tied head: wte is written once, from layer 0
                continue
            tensor = tensors[name]
            hf[hf_name] = (tensor.t() if transposed else tensor).contiguous()
    return hf


def write_hf(cfg, tensors: dict, out: Path) -> None:
    save_file(export_tensors(cfg, tensors), out / HF_WEIGHTS, metadata={"format": "pt"})
    (out / HF_CONFIG).write_text(json.dumps(export_config(cfg), indent=1) + "\n")
