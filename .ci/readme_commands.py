"""Run every shell command README.md shows, as written, and time each one.

    python .ci/readme_commands.py --bare VENV --dev VENV [--readme README.md] [--only HEADING]

The README is the newcomer's contract, so CI follows it line by line in a fresh copy of the
repository (tracked and untracked-but-not-ignored files), in README order:
- every ```bash block (indented ones too) is split into commands (a trailing backslash joins
  lines; comment-only lines are skipped), each run with bash from the copy's root;
- a block runs in the environment of the first set-up command (VENV `--bare`: a bare venv with
  only torch) unless it installs the dev extra or its first line is TEST_ENV_MARK: then in the
  environment of the second (`--dev`);
- a command marked GPU_ONLY_MARK runs with `--dry-run` appended;
- outside the set-up section every command runs with $MINIPIPE_STEP_LIMIT=2 (the one shortening,
  documented in the README): each training run trains at most 2 steps, then validates, saves and
  samples as it would at --steps;
- an inline `code span` that reads like a command (python, torchrun, bash, pip ...) must also be
  in a block, so no command escapes the check.
The GPT-2 example needs a GPT-2 directory and token files: `readme_fixtures.py` makes small ones
(transformers' GPT2Config, random weights and ids) where the README says they go.
Any failing command stops the run with its output and exit code 1.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

STEP_LIMIT = "2"
SETUP_HEADING = "## Set up on a fresh machine"
TEST_ENV_MARK = "# in the test environment (the second set-up command)"
GPU_ONLY_MARK = "# GPU only"
COMMAND_WORDS = ("python ", "python3 ", "torchrun ", "bash ", "pip ", "wandb ")
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>\S*)\s*$")


def blocks(readme: str) -> list[dict]:
    """Every ```bash block: {"heading", "setup", "lines"} with the fence's indent removed."""
    found, heading, current, indent = [], "", None, 0
    for line in readme.splitlines():
        fence = FENCE.match(line)
        if current is None:
            if line.startswith("## "):
                heading = line.strip()
            elif fence and fence["lang"] == "bash":
                current, indent = [], len(fence["indent"])
        elif fence:
            found.append({"heading": heading, "setup": heading == SETUP_HEADING, "lines": current})
            current = None
        else:
            current.append(line[indent:])
    return found


def commands(lines: list[str]) -> list[str]:
    """A block's commands: continuation lines joined, comment-only and blank lines dropped."""
    joined, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1].rstrip() + " "
            continue
        text = (pending + line.strip()).strip()
        pending = ""
        if text and not text.startswith("#"):
            joined.append(text)
    return joined


def as_run(command: str) -> str:
    """GPU-only commands run in their --dry-run form: the flag goes before the mark's comment."""
    if GPU_ONLY_MARK not in command:
        return command
    return command[: command.index(GPU_ONLY_MARK)].rstrip() + " --dry-run"


def stray_inline_commands(readme: str, block_text: str) -> list[str]:
    """Inline code spans outside blocks that read like a shell command but are in no block."""
    outside = re.sub(r"```.*?```", "", readme, flags=re.S)
    spans = re.findall(r"`([^`\n]+)`", outside)
    return [s for s in spans if s.startswith(COMMAND_WORDS) and s not in block_text]


def fresh_copy(repo: Path, into: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=repo, check=True, capture_output=True).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = repo / name
        if source.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)


def venv_env(venv: Path, limit_steps: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env.pop("MINIPIPE_STEP_LIMIT", None)
    if limit_steps:
        env["MINIPIPE_STEP_LIMIT"] = STEP_LIMIT
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bare", required=True, type=Path, help="venv of the first set-up command")
    parser.add_argument("--dev", required=True, type=Path, help="venv of the second (the dev extra)")
    parser.add_argument("--readme", type=Path, default=Path(__file__).resolve().parents[1] / "README.md")
    parser.add_argument("--workdir", type=Path, help="where to copy the repository (default: a temp dir)")
    parser.add_argument("--only", help="run only the blocks under headings containing this text")
    args = parser.parse_args(argv)
    repo = args.readme.resolve().parent
    readme = args.readme.read_text()
    found = blocks(readme)
    stray = stray_inline_commands(readme, "\n".join(line for b in found for line in b["lines"]))
    if stray:
        print("README commands outside a ```bash block (CI runs only blocks):", *stray, sep="\n  ")
        return 1
    work = args.workdir or Path(os.environ.get("TMPDIR", "/tmp")) / f"readme-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    fresh_copy(repo, work)
    made_fixtures = False
    timings = []
    for block in found:
        if args.only and args.only not in block["heading"]:
            continue
        text = "\n".join(block["lines"])
        dev = '".[dev]"' in text or (block["lines"] and block["lines"][0].strip() == TEST_ENV_MARK)
        venv = (args.dev if dev else args.bare).resolve()
        if "hf/" in text and not made_fixtures:
            subprocess.run([str(args.dev.resolve() / "bin" / "python"), str(repo / ".ci" / "readme_fixtures.py"),
                            str(work)], check=True)
            made_fixtures = True
        for command in commands(block["lines"]):
            run = as_run(command)
            print(f"\n$ {run}    [{'test' if dev else 'bare'} env"
                  f"{'' if block['setup'] else ', MINIPIPE_STEP_LIMIT=' + STEP_LIMIT}]", flush=True)
            started = time.perf_counter()
            done = subprocess.run(["bash", "-o", "pipefail", "-c", run], cwd=work,
                                  env=venv_env(venv, not block["setup"]), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=1800)
            seconds = time.perf_counter() - started
            output = done.stdout.splitlines()
            print("\n".join(output if done.returncode else output[-8:]), flush=True)
            if done.returncode:
                print(f"README command failed (exit {done.returncode}) after {seconds:.0f} s: {run}")
                return 1
            timings.append((seconds, run))
    print("\nREADME commands, each as written (seconds):")
    for seconds, run in timings:
        print(f"{seconds:7.1f}  {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
