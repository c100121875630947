"""One dataclass holds every setting; every field is a CLI flag (kebab-case) and may come from a
TOML file. Precedence: field default < preset < --config FILE.toml < explicit flags.

Model-shape fields default to None and are filled from the preset, so `--preset small --layers 8`
means "small, but 8 layers". Fields that depend on the data (vocab, classes, channels) stay None
until `minipipe.data` has looked at the data.
"""
import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Optional, get_args, get_origin, Union

from minipipe.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def _f(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    # model
    model: str = _f("transformer", "model family", ("transformer", "amoebanet"))
    preset: str = _f("tiny", "model size preset (see models.PRESETS)", ("tiny", "small", "gpipe"))
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
    dropout: float = _f(0.0, "dropout probability (Transformer)")
    kernels: str = _f("auto", "op implementations: auto = triton on CUDA, torch on CPU",
                      ("auto", "triton", "torch"))
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
    # precision defaults (issue 9): 'auto' is resolved by make_config, so the rest of the run (and
    # its checkpoints and logs) sees the dtype it actually runs with
    dtype: str = _f("auto", "parameter/compute dtype; bf16/fp16 = autocast with fp32 weights; auto = "
                            "bfloat16 on CUDA, float32 on CPU",
                    ("auto", "float32", "bfloat16", "float16", "float64"))
    device: str = _f("auto", "auto = cuda:LOCAL_RANK when available, else cpu", ("auto", "cpu", "cuda"))
    # data and output
    data: Optional[str] = _f(None, "stdlib | digits | synthetic | PATH (text, dir, .bin, .npz); "
                                   "default stdlib (transformer) or digits (amoebanet)")
    eval_every: int = _f(50, "validate every N steps (0 = only at the end)")
    eval_batches: int = _f(4, "validation batches per evaluation")
    log_every: int = _f(10, "console line every N steps")
    metrics_jsonl: Optional[str] = _f(None, "write one JSON line of metrics per step here")
    out_dir: str = _f("out", "directory for run outputs (wandb files)")
    sample: int = _f(0, "after training, generate and print N bytes (Transformer)")
    # pipeline
    stages: Optional[int] = _f(None, "pipeline stages K (default: world size / dp)")
    dp: int = _f(1, "data-parallel replicas of the pipeline (world = dp x stages)")
    balance: Optional[str] = _f(None, "explicit layers per stage, e.g. 3,3,2")
    balance_by: str = _f("params", "cost used to cut stages", ("params", "time", "memory"))
    recompute: str = _f("always", "re-materialisation (GPipe 2.3)", ("always", "except_last", "never"))
    deferred_bn: bool = _f(False, "BatchNorm running stats over the whole mini-batch, not per micro-batch")
    timeout: float = _f(300.0, "seconds any stage waits on another before failing with an error")
    # tracking
    wandb: str = _f("auto", "wandb on rank 0: auto = $WANDB_MODE if set, else online with an API "
                            "key, else offline", ("auto", "online", "offline", "disabled"))
    wandb_project: str = _f("minipipe", "wandb project")
    wandb_group: Optional[str] = _f(None, "wandb group (a sweep's runs share one)")
    run_name: Optional[str] = _f(None, "wandb run name (default: wandb picks one)")
    trace: Optional[str] = _f(None, "write the pipeline timeline of --trace-steps here: "
                                    "Chrome-trace JSON (Perfetto) and a PNG Gantt chart beside it")
    trace_steps: str = _f("1", "0-based steps to trace, comma-separated (default: the 2nd, after warm-up)")
    # checkpoints
    ckpt_dir: Optional[str] = _f(None, "save sharded safetensors checkpoints here (default: none, no saving)")
    ckpt_every: int = _f(0, "also save every N steps (0 = only at the end and on SIGTERM)")
    keep: int = _f(3, "complete checkpoints to keep in --ckpt-dir (0 = all)")
    resume: str = _f("auto", "auto = the latest checkpoint in --ckpt-dir, if any; none; or a checkpoint PATH")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _base_type(tp):
    if get_origin(tp) is Union:
        return next(a for a in get_args(tp) if a is not type(None))
    return tp


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="minipipe: GPipe training", allow_abbrev=False)
    parser.add_argument("--config", metavar="FILE.toml", help="settings file; flags override it")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        tp = _base_type(eval(f.type) if isinstance(f.type, str) else f.type)
        kwargs = dict(help=f.metadata["help"], default=argparse.SUPPRESS, dest=f.name)
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(flag, type=tp, choices=f.metadata["choices"], **kwargs)
    return parser


def _from_toml(path: str) -> dict:
    try:
        with open(path, "rb") as fh:
            values = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file")
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--config {path}: not valid TOML ({err})")
    known = {f.name for f in dataclasses.fields(Config)}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"--config {path}: unknown settings {unknown}; valid names are the flags "
                          f"of `python train.py --help` without the leading dashes")
    return values


def parse_config(argv=None) -> Config:
    """Flags (and an optional TOML file) -> a validated Config with the preset applied."""
    args = vars(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    toml_path = args.pop("config", None)
    values = _from_toml(toml_path) if toml_path else {}
    values.update(args)
    return make_config(**values)


def make_config(**values) -> Config:
    """Config from keyword values (tests and tools use this): preset applied, then validated."""
    from models import apply_preset  # the presets live beside the models they describe
    try:
        cfg = Config(**values)
    except TypeError as err:
        raise ConfigError(f"unknown setting: {err}")
    for f in dataclasses.fields(Config):
        choices = f.metadata["choices"]
        if choices and getattr(cfg, f.name) not in choices:
            raise ConfigError(f"--{f.name.replace('_', '-')} {getattr(cfg, f.name)!r}: "
                              f"choose one of {', '.join(choices)}")
    apply_preset(cfg)
    cfg.dtype = resolve_dtype(cfg.dtype, cfg.device)
    validate(cfg)
    return cfg


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' -> bfloat16 autocast (fp32 master weights) when the run will be on CUDA, float32
    otherwise; any other choice passes through."""
    if dtype != "auto":
        return dtype
    import torch  # only here: the config stays importable without torch
    on_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return "bfloat16" if on_cuda else "float32"


def validate(cfg: Config) -> None:
    """Checks that need no data and no processes; every message says what to change."""
    positive = ["batch_size", "microbatches", "dp", "eval_batches", "log_every"]
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(cfg, name)})")
    for name in ("steps", "warmup", "eval_every", "sample", "grad_clip", "weight_decay"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(cfg, name)})")
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
    if cfg.lr <= 0 or cfg.min_lr < 0 or cfg.min_lr > cfg.lr:
        raise ConfigError(f"need 0 <= --min-lr <= --lr and --lr > 0 (got lr={cfg.lr}, min-lr={cfg.min_lr})")
    if cfg.timeout <= 0:
        raise ConfigError(f"--timeout must be > 0 seconds (got {cfg.timeout})")
    if cfg.trace and any(step >= cfg.steps for step in traced_steps(cfg)):
        raise ConfigError(f"--trace-steps {cfg.trace_steps}: every traced step must be below "
                          f"--steps {cfg.steps} (steps count from 0)")
    if cfg.model == "transformer":
        if cfg.d_model % cfg.heads:
            raise ConfigError(f"--d-model {cfg.d_model} is not divisible by --heads {cfg.heads}")
        if cfg.seq_len > cfg.max_seq_len:
            raise ConfigError(f"--seq-len {cfg.seq_len} is over the model's maximum {cfg.max_seq_len}; "
                              f"lower --seq-len or raise --max-seq-len")
        if cfg.seq_len < 1:
            raise ConfigError(f"--seq-len must be >= 1 (got {cfg.seq_len})")
    if cfg.dtype == "float64" and cfg.device == "cuda":
        raise ConfigError("--dtype float64 is for exactness tests on CPU; use --device cpu")
    for name in ("ckpt_every", "keep"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(cfg, name)})")


def traced_steps(cfg: Config) -> set[int]:
    """The 0-based steps --trace records (none without --trace)."""
    if not cfg.trace:
        return set()
    try:
        steps = {int(part) for part in cfg.trace_steps.split(",")}
    except ValueError:
        raise ConfigError(f"--trace-steps {cfg.trace_steps!r}: give step numbers, e.g. 1 or 1,5")
    if min(steps) < 0:
        raise ConfigError(f"--trace-steps {cfg.trace_steps!r}: steps count from 0")
    return steps
