"""Test-wide settings."""
import os

# wandb's default here is offline, which writes a run directory per training job; tests that
# check wandb ask for it explicitly (--wandb offline), the rest write nothing.
os.environ.setdefault("WANDB_MODE", "disabled")
# The README check caps every run's steps; a test's runs train what the test says.
os.environ.pop("MINIPIPE_STEP_LIMIT", None)


import pytest  # noqa: E402

# The smallest Transformer run the CLI accepts quickly: 2 steps on synthetic data, nothing saved.
TINY_FLAGS = ["--layers", "2", "--d-model", "16", "--heads", "2", "--max-seq-len", "8",
              "--data", "synthetic", "--batch-size", "8", "--microbatches", "2", "--steps", "2",
              "--eval-every", "0", "--eval-batches", "1", "--log-every", "100"]


@pytest.fixture
def cli(capsys):
    """cli(*flags) -> (exit code, the `minipipe ...` line of stderr, all of stderr) of train.main
    in this process, after the tiny flags (later flags win)."""
    import train

    def run(*flags):
        code = train.main([*TINY_FLAGS, *map(str, flags)])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        return code, next((line for line in lines if line.startswith("minipipe")), ""), err
    return run
