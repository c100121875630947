"""One metrics path: rank 0 hands every record to a list of backends (console, JSONL, wandb).

Backends implement `config(dict)`, `log(step, dict)` and `close()`; a recording backend in the
tests proves that the config and every value reach each backend. Other ranks log nothing: values
from other stages reach rank 0 through `timeline.pipeline_stats`, once per log interval.
"""
import json
import math
import netrc
import os
import queue
import re
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from minipipe.config import WANDB_MODES
from minipipe.errors import ConfigError
from minipipe.layers import count_layer_params
from minipipe.partition import stage_ranges
from minipipe.schedule.check import theory_bubble

WANDB_INIT_TIMEOUT_S = 20  # wandb's default waits 90 s for an unreachable server
# Dense peak TFLOP/s per device and compute precision: bf16 (= fp16) and tf32 on tensor cores, fp32
# on the FMA units (vendor data sheets, no sparsity). A device is matched by whole words of its CUDA
# name, first match wins, most specific first: "NVIDIA L4" is not an "L40", an "H100 NVL" is not
# an H100 SXM ("NVIDIA H100 80GB HBM3"). A device not listed gets TFLOP/s but no MFU.
PEAK_TFLOPS = [
    (("GH200",), dict(bf16=989.0, tf32=494.5, fp32=67.0)),
    (("H200",), dict(bf16=989.0, tf32=494.5, fp32=67.0)),
    (("H100", "NVL"), dict(bf16=835.0, tf32=417.5, fp32=60.0)),
    (("H100", "PCIe"), dict(bf16=756.0, tf32=378.0, fp32=51.0)),
    (("H100",), dict(bf16=989.0, tf32=494.5, fp32=67.0)),
    (("B200",), dict(bf16=2250.0, tf32=1100.0, fp32=75.0)),
    (("A100",), dict(bf16=312.0, tf32=156.0, fp32=19.5)),
    (("L40S",), dict(bf16=362.0, tf32=183.0, fp32=91.6)),
    (("L40",), dict(bf16=181.0, tf32=90.5, fp32=90.5)),
    (("L4",), dict(bf16=121.0, tf32=60.0, fp32=30.3)),
    (("A10G",), dict(bf16=70.0, tf32=35.0, fp32=31.2)),
    (("A10",), dict(bf16=125.0, tf32=62.5, fp32=31.2)),
    (("4090",), dict(bf16=165.2, tf32=82.6, fp32=82.6)),
]


class JsonlBackend:
    """One JSON object per line: {"step": s, ...values}."""

    def __init__(self, path: str):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a")

    def config(self, values: dict) -> None:
        pass

    def log(self, step: int, values: dict) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class ConsoleBackend:
    """A concise line every `every` steps (and every validation): step/total, loss, speed, ETA."""

    def __init__(self, total_steps: int, every: int):
        self.total, self.every = total_steps, every
        self.started = time.perf_counter()
        self.first_step = None

    def config(self, values: dict) -> None:
        pass

    def log(self, step: int, values: dict) -> None:  # step counts from 1, as everywhere
        if "val_loss" in values:
            print(f"step {step}/{self.total} | val loss {values['val_loss']:.4f}", flush=True)
        if "loss" not in values:
            return
        if self.first_step is None:
            self.first_step, self.started = step, time.perf_counter()
        if step % self.every and step != self.total:
            return
        done = step - self.first_step + 1
        eta = (time.perf_counter() - self.started) / done * (self.total - step)
        speed = (f"{values['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in values
                 else f"{values['samples_per_s']:,.1f} samples/s")
        extra = "".join(f" | {label} {values[key]:{fmt}}" for key, label, fmt in
                        (("bubble_measured", "bubble", ".2f"), ("mfu", "mfu", ".1%")) if key in values)
        print(f"step {step}/{self.total} | loss {values['loss']:.4f} | lr {values['lr']:.2e} | "
              f"grad norm {values['grad_norm']:.3f} | {speed}{extra} | eta {_duration(eta)}", flush=True)

    def close(self) -> None:
        pass


class WandbBackend:
    """One wandb run per training job, on rank 0, written under {out_dir}/wandb. A run never fails
    for lack of network: when online init fails it logs offline (sync later with `wandb sync`).

    Records reach wandb from a thread of their own: `run.log` waits for wandb's asyncio thread
    (a GIL hand-off: about 1 ms, at times past 100 ms), and rank 0 is on every step's critical
    path, so the step loop only queues the record. close() sends what is queued, then finishes."""

    def __init__(self, cfg):
        import wandb  # imported only when used: it takes ~1 s
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        mode = wandb_mode(cfg.wandb)
        # Started before any rank waits on another (train.py), and bounded well below --timeout,
        # so an unreachable server never shows up as a stage timeout on the other ranks.
        init_timeout = min(WANDB_INIT_TIMEOUT_S, cfg.timeout / 4)
        kwargs = dict(project=cfg.wandb_project, group=cfg.wandb_group, name=cfg.run_name,
                      dir=cfg.out_dir, settings=wandb.Settings(init_timeout=init_timeout))
        try:
            self.run = wandb.init(mode=mode, **kwargs)
        except Exception as err:  # wandb raises many types (UsageError, CommError, timeouts)
            if mode != "online":
                raise
            print(f"warning: wandb online init failed ({err}); logging offline instead",
                  file=sys.stderr, flush=True)
            self.run = wandb.init(mode="offline", **kwargs)
        self.records, self.failure = queue.SimpleQueue(), None
        self.sender = threading.Thread(target=self._send, name="wandb-log", daemon=True)
        self.sender.start()

    def config(self, values: dict) -> None:
        self.run.config.update(values, allow_val_change=True)

    def log(self, step: int, values: dict) -> None:
        if self.failure is not None:  # the sender stopped: say why, in the training loop
            raise self.failure
        self.records.put((step, dict(values)))

    def _send(self) -> None:
        while (record := self.records.get()) is not None:
            try:
                self.run.log(record[1], step=record[0])
            except Exception as err:  # wandb raises many types; kept for the loop to raise
                self.failure = err
                return

    def close(self) -> None:
        self.records.put(None)
        self.sender.join()
        self.run.finish()


def wandb_mode(requested: str) -> str:
    """auto: $WANDB_MODE when set, else online when an API key is configured, else offline.
    wandb itself reads $WANDB_MODE too, so a value it would choke on is refused whatever --wandb."""
    env_mode = os.environ.get("WANDB_MODE")
    if env_mode is not None and env_mode not in WANDB_MODES:
        raise ConfigError(f"WANDB_MODE={env_mode!r} is not a wandb mode; set it to one of "
                          f"{', '.join(WANDB_MODES)} or unset it (and choose with --wandb)")
    if requested != "auto":
        return requested
    if env_mode is not None:
        return env_mode
    return "online" if has_wandb_key() else "offline"


def has_wandb_key() -> bool:
    """WANDB_API_KEY, or a netrc entry for the wandb host (where `wandb login` stores the key).
    Reads local files only: no network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def compute_precision(dtype: str, tf32: bool) -> str:
    """The precision a run's matmuls execute in: autocast bf16/fp16 -> 'bf16' (one peak for both),
    float32 -> 'tf32' where TF32 is allowed, else 'fp32'; float64 has no entry (no MFU)."""
    if dtype in ("bfloat16", "float16"):
        return "bf16"
    if dtype == "float32":
        return "tf32" if tf32 else "fp32"
    return dtype


def peak_tflops(device_name: str, precision: str = "bf16") -> float | None:
    words = set(re.split(r"[^A-Za-z0-9]+", device_name))
    for required, peaks in PEAK_TFLOPS:
        if words.issuperset(required):
            return peaks.get(precision)
    return None


def flops_utilisation(units_per_s: float, flops_per_unit: float, n_devices: int,
                      device_name: str, precision: str = "bf16") -> dict:
    """Achieved model TFLOP/s per device (forward + backward, recompute not counted, as in MFU)
    and MFU against the device's dense peak in the precision the run computes in, when the table
    knows both."""
    achieved = flops_per_unit * units_per_s / n_devices / 1e12
    values = {"tflops_per_device": achieved}
    peak = peak_tflops(device_name, precision)
    if peak:
        values["mfu"] = achieved / peak
    return values


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class MetricsLogger:
    def __init__(self, backends: list):
        self.backends = backends

    def config(self, values: dict) -> None:
        for backend in self.backends:
            backend.config(values)

    def log(self, step: int, values: dict) -> None:
        for backend in self.backends:
            backend.log(step, values)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()


def config_record(cfg, balance: list[int], spec) -> dict:
    """What a run logs once: every config field, and the partition plan under 'plan' (balance: the
    layers of each of the K*V model chunks; spec: the run's PipelineSpec)."""
    params = count_layer_params(cfg, spec.tie_copied)
    ranges = stage_ranges(balance)
    plan = {"balance": list(balance), "stage_layers": [f"{r.start}-{r.stop - 1}" for r in ranges],
            "stage_params": [sum(params[i] for i in r) for r in ranges],
            "bubble_theory": theory_bubble(spec.schedule, spec.n_stages, spec.n_microbatches,
                                           spec.virtual_stages)}
    return {**cfg.to_dict(), "plan": plan}


def make_logger(cfg, rank: int) -> MetricsLogger:
    """Rank 0: console, plus JSONL with --metrics-jsonl, plus wandb unless --wandb disabled."""
    if rank != 0:
        return MetricsLogger([])
    backends = [ConsoleBackend(cfg.steps, cfg.log_every)]
    if cfg.metrics_jsonl:
        backends.append(JsonlBackend(cfg.metrics_jsonl))
    if wandb_mode(cfg.wandb) != "disabled":
        backends.append(WandbBackend(cfg))
    return MetricsLogger(backends)
