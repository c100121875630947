"""The README's commands are what CI runs (.ci/readme_commands.py runs them all, as written, in
fresh environments); these fast checks catch a README that the runner would misread, and the
examples and tools the README promises."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minipipe import command_line
from tests.spawn import REPO_ROOT

README = (Path(REPO_ROOT) / "README.md").read_text()


def _runner():
    spec = importlib.util.spec_from_file_location("readme_commands", Path(REPO_ROOT) / ".ci" / "readme_commands.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_command_the_readme_shows_is_in_a_block_the_ci_runs():
    runner = _runner()
    blocks = runner.blocks(README)
    block_text = "\n".join(line for block in blocks for line in block["lines"])
    assert runner.stray_inline_commands(README, block_text) == []
    setup = [runner.commands(b["lines"]) for b in blocks if b["setup"]]
    assert setup == [["pip install torch==2.13.0 && pip install -e . && torchrun --standalone "
                      "--nproc_per_node=2 train.py --sample 200"],
                     ['pip install torch==2.13.0 && pip install -e ".[dev]" && OMP_NUM_THREADS=1 '
                      'python -m pytest -q']]
    every = [c for b in blocks for c in runner.commands(b["lines"])]
    assert len(every) >= 20 and all(c.split()[0] in ("pip", "python", "torchrun", "bash") for c in every)
    gpu_only = [runner.as_run(c) for c in every if runner.GPU_ONLY_MARK in c]
    assert gpu_only == ["bash bench/gpu_check.sh --dry-run"]


def test_the_runner_joins_continued_lines_and_skips_comments():
    runner = _runner()
    text = "## Set up on a fresh machine\n\n  ```bash\n  # a comment\n  python a.py \\\n      --x 1  # why\n  ```\n"
    (block,) = runner.blocks(text)
    assert block["setup"] and runner.commands(block["lines"]) == ["python a.py --x 1  # why"]
    assert runner.stray_inline_commands("run `python b.py` here", "python a.py") == ["python b.py"]


@pytest.mark.parametrize("name", ["stdlib-tiny", "gpipe-paper", "gpt2-finetune"])
def test_the_example_configs_are_valid_and_used_by_the_readme(name):
    path = Path(REPO_ROOT) / "configs" / f"{name}.toml"
    assert f"configs/{name}.toml" in README
    values = command_line.toml_values(str(path))  # every key a flag, every value of its type
    if "init_from" not in values:  # a GPT-2 directory is the user's to bring
        command_line.parse_config(["--config", str(path)])


def test_gpu_check_says_what_it_needs_before_running_anything(tmp_path):
    fake = tmp_path / "python"  # a python without pytest
    fake.write_text(f'#!/bin/sh\ncase "$2" in *pytest*) exit 1;; esac\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
           "GPU_CHECK_OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "missing: pytest" in done.stderr and 'pip install -e ".[dev]"' in done.stderr
    assert not (tmp_path / "out").exists()  # no part ran
