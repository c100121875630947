"""The command line and the settings file as a Config: a flag per Config field (kebab-case;
booleans take --x / --no-x) and `--config FILE.toml` under them, the TOML's keys named as the
flags. Both only gather values; config.make_config checks and settles them. A leaf, like the
config: no torch, no models.
"""
import argparse
import dataclasses
import os
import sys

from minipipe.config import Config, checked_values, field_type, make_config
from minipipe.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="minipipe: GPipe training", allow_abbrev=False)
    parser.add_argument("--config", metavar="FILE.toml", help="settings file; flags override it")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        tp = field_type(f)
        kwargs = dict(help=f.metadata["help"], default=argparse.SUPPRESS, dest=f.name)
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(flag, type=tp, choices=f.metadata["choices"], **kwargs)
    return parser


def toml_values(path: str) -> dict:
    """The settings of a TOML file, every key a Config field and every value of its type."""
    if os.path.exists(path) and not (os.path.isfile(path) or os.path.isdir(path)):
        raise ConfigError(f"--config {path} is not a regular file (a device or a pipe would be "
                          f"read forever); give a .toml file")
    try:
        with open(path, "rb") as fh:
            values = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file")
    except IsADirectoryError:
        raise ConfigError(f"--config {path} is a directory; give a .toml file")
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot be read ({err.strerror})")
    except UnicodeDecodeError as err:
        raise ConfigError(f"--config {path}: not UTF-8 text ({err.reason} at byte {err.start}); "
                          f"save the file as UTF-8")
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--config {path}: not valid TOML ({err})")
    known = {f.name for f in dataclasses.fields(Config)}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"--config {path}: unknown settings {unknown}; valid names are the flags "
                          f"of `python train.py --help` without the leading dashes")
    try:
        return checked_values(values)
    except ConfigError as err:
        raise ConfigError(f"--config {path}: {err}") from None


def parse_config(argv=None) -> Config:
    """Flags (and an optional TOML file) -> a validated Config with the preset applied."""
    args = vars(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    toml_path = args.pop("config", None)
    values = toml_values(toml_path) if toml_path else {}
    values.update(args)
    return make_config(**values)
