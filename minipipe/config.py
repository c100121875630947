"""One dataclass holds every setting; every field is a CLI flag (kebab-case) and may come from a
TOML file (both read by minipipe.command_line). Precedence: field default < preset < --config
FILE.toml < explicit flags.

Model-shape fields default to None and are filled from the preset, so `--preset small --layers 8`
means "small, but 8 layers". Fields that depend on the data (vocab, classes, channels) stay None
until `minipipe.data` has looked at the data.

This module is a leaf: it imports neither torch nor the models, so importing it (or making a
Config) has no side effects such as choosing the Triton interpreter. Each option's choices are
defined once: here, or in the torch-free module that implements them (model families and presets
in minipipe.presets, schedules in minipipe.schedule.actions).
"""
import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from typing import Optional, Union, get_args, get_origin

from minipipe.errors import ConfigError
from minipipe.presets import LANGUAGE_MODELS, MODEL_FAMILIES, PRESET_NAMES, PRESETS, preset_values
from minipipe.schedule.actions import SCHEDULES, implied_virtual_stages
from minipipe.schedule.csv_format import file_virtual_stages

# Choices of options that other modules also name (the rest are written where their field is).
KERNEL_BACKENDS = ("auto", "triton", "torch")  # = kernels.runtime.BACKENDS, which may not be imported here
WANDB_MODES = ("online", "offline", "disabled")  # also the values $WANDB_MODE may take


def _f(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class Config:
    # model
    model: str = _f("transformer", "model family", MODEL_FAMILIES)
    preset: str = _f("tiny", "model size preset (see minipipe/presets.py)", PRESET_NAMES)
    layers: Optional[int] = _f(None, "Transformer blocks")
    d_model: Optional[int] = _f(None, "Transformer width")
    heads: Optional[int] = _f(None, "attention heads")
    max_seq_len: Optional[int] = _f(None, "positions the model can attend over")
    seq_len: Optional[int] = _f(None, "training context length (default: max-seq-len)")
    vocab: Optional[int] = _f(None, "vocabulary size (default: from the data; required for .bin ids)")
    cells: Optional[int] = _f(None, "AmoebaNet-D normal cells per group (the paper's L = 3 x cells)")
    filters: Optional[int] = _f(None, "AmoebaNet-D D: filters of the first group")
    image_size: Optional[int] = _f(None, "AmoebaNet input height = width")
    classes: Optional[int] = _f(None, "AmoebaNet classes (default: from the data)")
    channels: Optional[int] = _f(None, "AmoebaNet input channels (default: from the data)")
    kv_heads: Optional[int] = _f(None, "Llama key/value heads (grouped-query attention; = --heads is "
                                       "multi-head)")
    ffn_dim: Optional[int] = _f(None, "Llama SwiGLU MLP width")
    rope_theta: Optional[float] = _f(None, "Llama rotary embedding base")
    norm_eps: Optional[float] = _f(None, "Llama RMSNorm epsilon")
    attention_bias: Optional[bool] = _f(None, "Llama q/k/v projections with biases (Qwen2's layout)")
    dropout: float = _f(0.0, "dropout probability (Transformer, Llama)")
    kernels: str = _f("auto", "op implementations: auto = triton on CUDA, torch on CPU",
                      KERNEL_BACKENDS)
    # optimisation
    batch_size: int = _f(32, "global mini-batch size (samples; split over dp replicas and micro-batches)")
    microbatches: int = _f(4, "micro-batches M per mini-batch")
    steps: int = _f(200, "optimizer steps")
    lr: float = _f(1e-3, "peak learning rate")
    warmup: int = _f(20, "linear warm-up steps")
    min_lr: float = _f(1e-4, "learning rate at the end of the cosine decay")
    weight_decay: float = _f(0.1, "AdamW decoupled weight decay (matrices only)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = off)")
    seed: int = _f(1337, "seed of every random stream (init, data, dropout)")
    # precision defaults: 'auto' is resolved by make_config, so the rest of the run (and
    # its checkpoints and logs) sees the dtype it actually runs with
    dtype: str = _f("auto", "parameter/compute dtype; bf16/fp16 = autocast with fp32 weights; auto = "
                            "bfloat16 on CUDA, float32 on CPU",
                    ("auto", "float32", "bfloat16", "float16", "float64"))
    device: str = _f("auto", "auto = cuda:LOCAL_RANK when available, else cpu", ("auto", "cpu", "cuda"))
    # data and output
    data: Optional[str] = _f(None, "stdlib | digits | synthetic | PATH (text, dir, .bin, .npz); "
                                   "default stdlib (transformer) or digits (amoebanet)")
    token_dtype: str = _f("uint16", "element type of .bin token-id files: uint16 (nanoGPT's) or "
                                    "uint32 (vocabularies over 65,536 ids, e.g. Llama 3's)",
                          ("uint16", "uint32"))
    eval_every: int = _f(50, "validate every N steps (0 = only at the end)")
    eval_batches: int = _f(4, "validation batches per evaluation")
    log_every: int = _f(10, "console line every N steps")
    metrics_jsonl: Optional[str] = _f(None, "write one JSON line of metrics per step here")
    out_dir: str = _f("out", "directory for run outputs (wandb files)")
    sample: int = _f(0, "after training, generate and print N tokens (Transformer, Llama)")
    # pipeline
    stages: Optional[int] = _f(None, "pipeline stages K (default: world size / dp)")
    dp: int = _f(1, "data-parallel replicas of the pipeline (world = dp x stages)")
    balance: Optional[str] = _f(None, "explicit layers per stage, e.g. 3,3,2")
    balance_by: str = _f("params", "cost used to cut stages", ("params", "time", "memory"))
    recompute: str = _f("always", "re-materialisation (GPipe 2.3)", ("always", "except_last", "never"))
    deferred_bn: bool = _f(False, "BatchNorm running stats over the whole mini-batch, not per micro-batch")
    timeout: float = _f(300.0, "seconds any stage waits on another before failing with an error")
    # pipeline schedules: see minipipe/schedule/actions.py
    schedule: str = _f("gpipe", "pipeline schedule: gpipe (fill-drain), 1f1b (PipeDream-flush), interleaved "
                                "(Megatron, needs --virtual-stages >= 2), zb-h1 (zero bubble at 1F1B's memory: "
                                "backward split into I and W), zbv (ZB-V) or dualpipev (DualPipeV, M >= 2K): "
                                "two chunks per stage in a V, stage r holds chunks r and 2K-1-r; or PATH.csv: a "
                                "schedule file in torch.distributed.pipelining's compute-only CSV form (a row "
                                "per stage, the rows place the chunks), proven before any rank waits")
    virtual_stages: Optional[int] = _f(None, "model chunks per stage V (interleaved: give it; zbv, dualpipev: "
                                             "2; a schedule file: its own; else 1); --balance lists K*V chunks")
    # tracking
    wandb: str = _f("auto", "wandb on rank 0: auto = $WANDB_MODE if set, else online with an API "
                            "key, else offline", ("auto", *WANDB_MODES))
    wandb_project: str = _f("minipipe", "wandb project")
    wandb_group: Optional[str] = _f(None, "wandb group (a sweep's runs share one)")
    run_name: Optional[str] = _f(None, "wandb run name (default: wandb picks one)")
    trace: Optional[str] = _f(None, "write the pipeline timeline of --trace-steps here: "
                                    "Chrome-trace JSON (Perfetto) and a PNG Gantt chart beside it")
    trace_steps: str = _f("2", "steps to trace (counting from 1), comma-separated (default: the 2nd, after warm-up)")
    # checkpoints
    ckpt_dir: Optional[str] = _f(None, "save sharded safetensors checkpoints here (default: none, no saving)")
    ckpt_every: int = _f(0, "also save every N steps (0 = only at the end and on SIGTERM)")
    keep: int = _f(3, "complete checkpoints to keep in --ckpt-dir (0 = all)")
    resume: str = _f("auto", "auto = the latest checkpoint in --ckpt-dir, if any; none; or a checkpoint PATH")
    # checkpoint-directory safety: a fresh run never mixes with (and prunes) another run's checkpoints
    overwrite_ckpt: bool = _f(False, "start a fresh run in a --ckpt-dir that holds another run's "
                                     "checkpoints (--keep may then prune them)")
    # Hugging Face in and out (minipipe/pipeline/tied.py, minipipe/checkpoint/hf_format.py)
    tie_embeddings: Optional[bool] = _f(None, "the head's weight is the token embedding, as in GPT-2 "
                                              "(default: off, or as the --init-from model is)")
    init_from: Optional[str] = _f(None, "start from a Hugging Face GPT-2 (--model transformer) or "
                                        "Llama/Qwen2 (--model llama) directory (config.json + "
                                        "safetensors); its config sets the shape; a checkpoint in "
                                        "--ckpt-dir wins")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @functools.cached_property
    def balance_counts(self) -> list[int] | None:
        """--balance parsed (layers per model chunk), or None; refused unless every part is a
        count >= 1."""
        if self.balance is None:
            return None
        parts = self.balance.split(",")
        if not all(re.fullmatch(r"\s*[0-9]+\s*", p) and int(p) >= 1 for p in parts):  # ASCII digits only
            raise ConfigError(f"--balance {self.balance!r}: give a layer count >= 1 per stage, e.g. 3,3,2")
        return [int(p) for p in parts]


def _base_type(tp):
    if get_origin(tp) is Union:
        return next(a for a in get_args(tp) if a is not type(None))
    return tp


def field_type(f: dataclasses.Field):
    return _base_type(eval(f.type) if isinstance(f.type, str) else f.type)


TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
# Settings that name a path: an empty one would mean "the current directory" or "unset" silently.
PATH_FIELDS = ("data", "metrics_jsonl", "out_dir", "trace", "ckpt_dir", "resume", "init_from")
MAX_LAYERS = 100_000  # --layers / --cells: far past any model that fits a machine
# gloo counts a timeout in milliseconds in 32 bits (24.8 days); a week is already "never".
TIMEOUT_RANGE_S = (0.01, 7 * 24 * 3600.0)


def checked_values(values: dict) -> dict:
    """Values of the right type for their fields (a TOML or keyword value is not parsed by
    argparse): `layers = "four"`, `steps = 2.5` or `deferred_bn = "false"` are refused, not cast.
    A list of ints for balance is accepted as the flag's "2,2" form."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    checked = {}
    for name, value in values.items():
        if name not in fields:
            raise ConfigError(f"unknown setting {name!r}; valid names are the flags of "
                              f"`python train.py --help` (dashes or underscores)")
        if (name == "balance" and isinstance(value, list)
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            value = ",".join(map(str, value))
        tp = field_type(fields[name])
        optional = fields[name].default is None
        ok = ((value is None and optional)
              or (isinstance(value, tp) and (tp is bool or not isinstance(value, bool)))
              or (tp is float and isinstance(value, int) and not isinstance(value, bool)))
        if not ok:
            raise ConfigError(f"{name} = {value!r}: expected {TYPE_NAMES[tp]}, got "
                              f"{type(value).__name__}")
        checked[name] = float(value) if tp is float and value is not None else value
    return checked


def make_config(**values) -> Config:
    """The settled Config of keyword values (command_line.parse_config's flags, tests, tools): types and choices
    checked, then --init-from's config.json, the tie, the preset and --dtype auto fill what the
    values leave open, and the result is validated. It is frozen: nothing changes it afterwards
    (dataclasses.replace makes a variant). Only the fields the data decides (vocab, classes,
    channels) may still be None: `with_data_fields` fills them, once, when the data is loaded."""
    cfg = Config(**checked_values(values))
    for f in dataclasses.fields(Config):
        choices = f.metadata["choices"]
        if choices and getattr(cfg, f.name) not in choices:
            raise ConfigError(f"{_flag(f.name)} {getattr(cfg, f.name)!r}: "
                              f"choose one of {', '.join(choices)}")
    cfg = _settle_schedule(cfg)
    if cfg.preset not in PRESETS[cfg.model]:
        raise ConfigError(f"--preset {cfg.preset!r} is not a {cfg.model} preset; "
                          f"choose one of {', '.join(PRESETS[cfg.model])}")
    if cfg.init_from:  # the imported model's config.json sets the shape before any preset
        from minipipe.checkpoint.hf_format import config_values  # (torch comes with it only for an import)
        cfg = dataclasses.replace(cfg, **config_values(cfg))
    if cfg.tie_embeddings and cfg.model not in LANGUAGE_MODELS:
        raise ConfigError(f"--tie-embeddings ties a language model's embedding and head; --model is {cfg.model!r}")
    values = preset_values(cfg)  # (a preset may tie: --preset smollm2)
    values["tie_embeddings"] = bool(values.get("tie_embeddings", cfg.tie_embeddings))
    cfg = dataclasses.replace(cfg, **values, dtype=resolve_dtype(cfg.dtype, cfg.device))
    validate(cfg)
    return cfg


def _settle_schedule(cfg: Config) -> Config:
    """A named schedule, or a schedule file whose V (chunks per row) becomes --virtual-stages;
    left out, V is the schedule's (actions.implied_virtual_stages)."""
    if not cfg.schedule.endswith(".csv"):
        if cfg.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule {cfg.schedule!r}: choose one of {', '.join(SCHEDULES)}, "
                              "or a .csv schedule file")
        if cfg.virtual_stages is not None:
            return cfg
        return dataclasses.replace(cfg, virtual_stages=implied_virtual_stages(cfg.schedule))
    v = file_virtual_stages(cfg.schedule)  # its placement checked (a ScheduleError is a ConfigError)
    if cfg.virtual_stages not in (None, v):
        raise ConfigError(f"--schedule {cfg.schedule} runs {v} model chunk(s) per stage; --virtual-stages "
                          f"{cfg.virtual_stages} disagrees (leave it out: the file decides)")
    return dataclasses.replace(cfg, virtual_stages=v)


def with_data_fields(cfg: Config, data_fields: dict) -> Config:
    """cfg with the fields the data decides (vocab, classes, channels) that it left unset filled
    from the loaded data's values, validated: the run's final Config."""
    cfg = dataclasses.replace(cfg, **{name: value for name, value in data_fields.items()
                                      if getattr(cfg, name) is None})
    validate(cfg)
    return cfg


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' -> bfloat16 autocast (fp32 master weights) when the run will be on CUDA, float32
    otherwise; any other choice passes through."""
    if dtype != "auto" or device == "cpu":
        return "float32" if dtype == "auto" else dtype
    if device == "auto":
        import torch  # only to ask for CUDA: the config stays importable without torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "bfloat16" if device == "cuda" else "float32"


def validate(cfg: Config) -> None:
    """Checks that need no data and no processes; every message says what to change."""
    for f in dataclasses.fields(Config):  # nan or inf would train (or fail) far from the flag
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{_flag(f.name)} must be a finite number (got {value})")
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if isinstance(value, str) and "\0" in value:
            raise ConfigError(f"{_flag(f.name)} holds a NUL character; give a plain value")
        if f.name in PATH_FIELDS and isinstance(value, str) and not value.strip():
            raise ConfigError(f"{_flag(f.name)} is empty; give a path (an empty one is not "
                              f"taken as unset: drop the flag to use the default)")
    positive = ["batch_size", "microbatches", "dp", "eval_batches", "log_every"]
    # model shape and cut: unset (None) until the preset or the data fills them
    positive += ["layers", "d_model", "heads", "max_seq_len", "vocab", "cells", "filters",
                 "image_size", "classes", "channels", "stages", "kv_heads", "ffn_dim"]
    for name in positive:
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ConfigError(f"{_flag(name)} must be >= 1 (got {value})")
    for name in ("layers", "cells"):  # the model is a list of layers: a billion never gets built
        if (getattr(cfg, name) or 0) > MAX_LAYERS:
            raise ConfigError(f"{_flag(name)} {getattr(cfg, name)} is over {MAX_LAYERS}: no model "
                              f"that large can be built; give a smaller count")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ConfigError(f"{_flag(name)} must be in [0, 1) (got {getattr(cfg, name)})")
    cfg.balance_counts  # parsed here once: a malformed --balance is refused with the flags
    if cfg.sample and cfg.model not in LANGUAGE_MODELS:
        raise ConfigError(f"--sample generates text: it needs a language model, --model "
                          f"{' or '.join(LANGUAGE_MODELS)} (got {cfg.model})")
    if cfg.sample and cfg.steps == 0:
        raise ConfigError("--sample generates after training, and --steps 0 trains nothing; "
                          "give --steps >= 1")
    for name in ("steps", "warmup", "eval_every", "sample", "grad_clip", "weight_decay",
                 "ckpt_every", "keep"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{_flag(name)} must be >= 0 (got {getattr(cfg, name)})")
    if cfg.batch_size % cfg.dp:
        raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by --dp {cfg.dp}; "
                          f"choose a batch size that is a multiple of {cfg.dp}")
    per_replica = cfg.batch_size // cfg.dp
    if per_replica % cfg.microbatches:
        raise ConfigError(f"batch size per replica {per_replica} (--batch-size {cfg.batch_size} / --dp "
                          f"{cfg.dp}) is not divisible by --microbatches {cfg.microbatches}; "
                          f"make --batch-size a multiple of dp x microbatches = {cfg.dp * cfg.microbatches}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"--dropout must be in [0, 1) (got {cfg.dropout})")
    if cfg.lr < 0 or cfg.min_lr < 0 or cfg.min_lr > cfg.lr:  # lr 0 keeps the weights (a round trip)
        raise ConfigError(f"need 0 <= --min-lr <= --lr (got lr={cfg.lr}, min-lr={cfg.min_lr})")
    low, high = TIMEOUT_RANGE_S
    if not low <= cfg.timeout <= high:
        raise ConfigError(f"--timeout must be between {low:g} and {high:g} seconds (a week); got "
                          f"{cfg.timeout:g}")
    if cfg.trace and any(step >= cfg.steps for step in traced_steps(cfg)):
        raise ConfigError(f"--trace-steps {cfg.trace_steps}: every traced step must be at most "
                          f"--steps {cfg.steps} (steps count from 1)")
    _validate_llama_fields(cfg)
    if cfg.model in LANGUAGE_MODELS:
        if cfg.d_model % cfg.heads:
            raise ConfigError(f"--d-model {cfg.d_model} is not divisible by --heads {cfg.heads}")
        if cfg.seq_len > cfg.max_seq_len:
            raise ConfigError(f"--seq-len {cfg.seq_len} is over the model's maximum {cfg.max_seq_len}; "
                              f"lower --seq-len" + (f" (the maximum is --init-from's {_max_positions_key(cfg)})"
                                                    if cfg.init_from else " or raise --max-seq-len"))
        if cfg.seq_len < 1:
            raise ConfigError(f"--seq-len must be >= 1 (got {cfg.seq_len})")
    if cfg.dtype == "float64" and cfg.device == "cuda":
        raise ConfigError("--dtype float64 is for exactness tests on CPU; use --device cpu")


def _max_positions_key(cfg: Config) -> str:
    """The config.json key an --init-from directory sets max_seq_len by (for messages)."""
    return "n_positions" if cfg.model == "transformer" else "max_position_embeddings"


LLAMA_FIELDS = ("kv_heads", "ffn_dim", "rope_theta", "norm_eps", "attention_bias")


def _validate_llama_fields(cfg: Config) -> None:
    if cfg.model != "llama":
        given = [_flag(name) for name in LLAMA_FIELDS if getattr(cfg, name) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} shape a Llama model; --model is {cfg.model!r}: "
                              f"drop them or pass --model llama")
        return
    for name in ("rope_theta", "norm_eps"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{_flag(name)} must be > 0 (got {getattr(cfg, name)})")
    if cfg.heads % cfg.kv_heads:
        raise ConfigError(f"--heads {cfg.heads} is not a multiple of --kv-heads {cfg.kv_heads}: each "
                          f"key/value head serves heads / kv-heads query heads")
    if cfg.d_model % cfg.heads == 0 and (cfg.d_model // cfg.heads) % 2:
        raise ConfigError(f"head dim {cfg.d_model // cfg.heads} (--d-model {cfg.d_model} / --heads "
                          f"{cfg.heads}) is odd: rotary embeddings rotate pairs of dims; make it even")


def traced_steps(cfg: Config) -> set[int]:
    """The loop indices (step - 1) of the steps --trace records (none without --trace)."""
    if not cfg.trace:
        return set()
    try:
        steps = {int(part) for part in cfg.trace_steps.split(",")}
    except ValueError:
        raise ConfigError(f"--trace-steps {cfg.trace_steps!r}: give step numbers, e.g. 2 or 2,5")
    if min(steps) < 1:
        raise ConfigError(f"--trace-steps {cfg.trace_steps!r}: steps count from 1")
    return {step - 1 for step in steps}
