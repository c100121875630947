"""Start-up checks of what lies outside the config: environment variables and output paths.

`check_before_work(cfg)` runs on every rank before the process group starts (train.py), so a bad
launcher variable (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_PORT), WANDB_MODE or an unwritable
--out-dir, --metrics-jsonl, --trace or MINIPIPE_CACHE stops every rank at once with the path and
the fix, instead of a ValueError at start-up or an OSError at the first write (for --trace, at
the traced step). Each directory is created if needed and proven writable with a probe file
that is removed again; nothing else is written. The checkpoint directory has its own claim
(checkpoint_dir.py), made once the ranks can agree.
"""
import os
import re
from pathlib import Path

from minipipe.data import cache_dir
from minipipe.errors import ConfigError
from minipipe.models import registry
from minipipe.tracking.metrics import wandb_mode

# What a launcher (torchrun) sets: name -> lowest and highest value that makes sense
LAUNCH_VARIABLES = {"WORLD_SIZE": (1, 1 << 20), "RANK": (0, 1 << 20), "LOCAL_RANK": (0, 1 << 20),
                    "MASTER_PORT": (1, 65535)}


def check_before_work(cfg) -> None:
    check_launch_env()
    tracking = wandb_mode(cfg.wandb)  # refuses a WANDB_MODE that wandb would choke on
    if tracking != "disabled":
        writable_directory(Path(cfg.out_dir), "--out-dir")
    for flag, path in (("--metrics-jsonl", cfg.metrics_jsonl), ("--trace", cfg.trace)):
        if path:
            writable_file(Path(path), flag)
    if (cfg.data or registry.family(cfg).default_data) == "stdlib":  # cached on first use
        writable_directory(cache_dir(), "MINIPIPE_CACHE")


def check_launch_env() -> None:
    """The launcher's variables are decimal integers in range, and RANK < WORLD_SIZE; else the
    process group would fail with a raw ValueError or wait on a port that cannot exist."""
    values = {}
    for name, (low, high) in LAUNCH_VARIABLES.items():
        text = os.environ.get(name)
        if text is None:
            continue
        if not re.fullmatch(r"[0-9]+", text.strip()) or not low <= int(text) <= high:
            raise ConfigError(f"environment variable {name}={text[:40]!r} is not an integer in "
                              f"{low}..{high}; launch with torchrun, which sets it, or fix its value")
        values[name] = int(text)
    world = values.get("WORLD_SIZE", 1)
    for name in ("RANK", "LOCAL_RANK"):
        if values.get(name, 0) >= world:
            raise ConfigError(f"environment variable {name}={values[name]} is not below "
                              f"WORLD_SIZE={world}; launch with torchrun, which sets both")


def writable_directory(path: Path, what: str) -> None:
    fix = f"point {what} at a directory you can write to"
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a directory; {fix}")
    problem = _probe(path)
    if problem:
        raise ConfigError(f"{what} {path} is not writable ({problem}); {fix}")


def writable_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory; give a file path")
    problem = ("it exists and is not writable" if path.exists() and not os.access(path, os.W_OK)
               else _probe(path.parent))
    if problem:
        raise ConfigError(f"{what} {path} cannot be written ({problem}); give a path in a "
                          f"directory you can write to")


def _probe(directory: Path) -> str | None:
    """Create the directory if needed and write (then remove) an empty file there: None when
    that works, else the reason."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".minipipe-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except (FileExistsError, NotADirectoryError):
        return "part of the path is a file, not a directory"
    except OSError as err:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    return None
