"""Every field is a flag; presets fill what is unset; bad settings are refused with the fix."""
import os
import subprocess
import sys

import pytest

from minipipe.command_line import build_parser, parse_config
from minipipe.config import Config, make_config
from minipipe.errors import ConfigError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_config_field_is_a_flag():
    flags = {a.dest for a in build_parser()._actions}
    missing = set(Config.__dataclass_fields__) - flags
    assert not missing, f"fields without a CLI flag: {missing}"


def test_flags_override_toml_which_overrides_preset(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('layers = 7\nd-model = 96\nlr = 0.5\n')
    cfg = parse_config(["--config", str(path), "--lr", "0.25", "--heads", "3"])
    assert (cfg.layers, cfg.d_model, cfg.lr, cfg.heads) == (7, 96, 0.25, 3)
    assert cfg.max_seq_len == 128  # still from the tiny preset


def test_unknown_toml_key_is_refused(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("layres = 3\n")
    with pytest.raises(ConfigError, match="layres"):
        parse_config(["--config", str(path)])


@pytest.mark.parametrize("kwargs,needle", [
    (dict(model="resnet"), "--model"),
    (dict(preset="huge"), "--preset"),
    (dict(batch_size=10, microbatches=4), "divisible by --microbatches"),
    (dict(batch_size=10, dp=4), "divisible by --dp"),
    (dict(seq_len=4096), "over the model's maximum"),
    (dict(d_model=30, heads=4), "not divisible by --heads"),
    (dict(microbatches=0), "--microbatches must be >= 1"),
])
def test_bad_settings_name_what_to_change(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        make_config(**kwargs)


def test_bad_choice_on_the_cli_exits_with_usage():
    with pytest.raises(SystemExit):
        parse_config(["--recompute", "sometimes"])


def test_the_config_is_a_leaf_without_side_effects():
    """Importing the config and making one imports neither torch nor the models (nor triton's
    interpreter switch): tools and tests can read settings without choosing a backend. The one
    exception: --dtype auto with --device auto asks torch whether CUDA is there."""
    code = ("import os, sys; os.environ.pop('TRITON_INTERPRET', None)\n"
            "from minipipe.command_line import parse_config\n"
            "from minipipe.config import make_config\n"
            "make_config(model='amoebanet', device='cpu')\n"
            "parse_config(['--layers', '3', '--dtype', 'float32'])\n"
            "loaded = [m for m in ('torch', 'models', 'kernels', 'triton') if m in sys.modules]\n"
            "assert not loaded and 'TRITON_INTERPRET' not in os.environ, loaded\n"
            "assert make_config().dtype in ('float32', 'bfloat16')\n"
            "loaded = [m for m in ('models', 'kernels', 'triton') if m in sys.modules]\n"
            "assert not loaded and 'TRITON_INTERPRET' not in os.environ, loaded\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr


def test_a_config_is_settled_once_and_frozen():
    """make_config settles the preset and --dtype auto; the data's fields are filled once, by
    load_settled, into a new Config: nothing changes a Config after it is made."""
    import dataclasses

    from minipipe.data import load_settled
    cfg = make_config(layers=2, data="synthetic", balance="1,1,1,1", dtype="auto", device="cpu")
    assert (cfg.d_model, cfg.seq_len, cfg.dtype, cfg.vocab) == (128, 128, "float32", None)
    assert cfg.balance_counts == [1, 1, 1, 1]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.layers = 3
    settled, data = load_settled(cfg)
    assert settled.vocab == data.vocab == 256 and cfg.vocab is None
    assert dataclasses.replace(settled, vocab=None) == cfg  # only the data's field was filled
    with pytest.raises(ConfigError, match=r"--balance '2,x': give a layer count >= 1 per stage"):
        make_config(balance="2,x")
