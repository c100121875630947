"""One metrics path: rank 0 hands every record to a list of backends (console, JSONL, ...).

Backends implement `config(dict)`, `log(step, dict)` and `close()`; a recording backend in the
tests proves that the config and every value reach each backend.
"""
import json
import math
import time
from pathlib import Path


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

    def log(self, step: int, values: dict) -> None:
        if "val_loss" in values:
            print(f"step {step + 1}/{self.total} | val loss {values['val_loss']:.4f}", flush=True)
        if "loss" not in values:
            return
        if self.first_step is None:
            self.first_step, self.started = step, time.perf_counter()
        if (step + 1) % self.every and step + 1 != self.total:
            return
        done = step - self.first_step + 1
        eta = (time.perf_counter() - self.started) / done * (self.total - step - 1)
        speed = (f"{values['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in values
                 else f"{values['samples_per_s']:,.1f} samples/s")
        print(f"step {step + 1}/{self.total} | loss {values['loss']:.4f} | lr {values['lr']:.2e} | "
              f"grad norm {values['grad_norm']:.3f} | {speed} | eta {_duration(eta)}", flush=True)

    def close(self) -> None:
        pass


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
