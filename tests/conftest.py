"""Test-wide settings."""
import ast
import inspect
import os

# wandb's default here is offline, which writes a run directory per training job; tests that
# check wandb ask for it explicitly (--wandb offline), the rest write nothing.
os.environ.setdefault("WANDB_MODE", "disabled")
# The README check caps every run's steps; a test's runs train what the test says.
os.environ.pop("MINIPIPE_STEP_LIMIT", None)
# Runs in this process are compared bitwise with worker processes, which run one thread each: a
# CPU reduction's order (an embedding's backward, say) depends on the thread count.
os.environ.setdefault("OMP_NUM_THREADS", "1")


# Triton's interpreter switch (off a GPU) before any test module imports triton: collection
# imports them all, and some (torch.distributed.pipelining's) import triton themselves.
import minipipe.kernels.runtime  # noqa: E402, F401


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


# ---- the `slow` marker: every test that starts several processes -----------------------------
# Multi-process tests all go through tests/spawn.py's helpers, so a test is marked `slow` when it
# calls one of them, directly, through a function of its own module, or through a fixture that
# does; `-m "not slow"` is the quick subset. (A marker computed here cannot be forgotten.)
SPAWN_HELPERS = {"run_torchrun", "run_workers"}
_spawning_by_module: dict = {}


def _spawning_names(module) -> set:
    """The module's functions (tests, fixtures, helpers) that reach a spawn helper."""
    tree = ast.parse(inspect.getsource(module))
    calls = {node.name: {call.func.id for call in ast.walk(node)
                         if isinstance(call, ast.Call) and isinstance(call.func, ast.Name)}
             for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    spawning = set(SPAWN_HELPERS)
    while True:
        found = {name for name, callees in calls.items() if callees & spawning} - spawning
        if not found:
            return spawning
        spawning |= found


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = getattr(item, "module", None)
        if module is None:
            continue
        if module.__name__ not in _spawning_by_module:
            _spawning_by_module[module.__name__] = _spawning_names(module)
        spawning = _spawning_by_module[module.__name__]
        if item.function.__name__ in spawning or spawning & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
