"""One import root: minipipe owns the name `minipipe` and nothing else, so it installs beside
transformers (whose dependency, Hugging Face's `kernels`, is imported as `kernels`)."""
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def _python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_bare_kernels_and_models_are_never_minipipes_packages(where, tmp_path):
    """From any directory, `import kernels` and `import models` never load a package of ours:
    our folders have no __init__.py, so at most they are PEP 420 namespace portions (found only
    when the checkout root is on sys.path and no regular package of that name is installed), and
    an installed regular package, such as Hugging Face's kernels, wins."""
    cwd = ROOT if where == "root" else tmp_path
    out = _python(
        "import importlib.util, pathlib\n"
        "import minipipe.kernels.ops, minipipe.models.registry\n"
        f"root = pathlib.Path({str(ROOT)!r})\n"
        "for name in ('kernels', 'models'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    origin = pathlib.Path(spec.origin) if spec and spec.origin else None\n"
        "    assert origin is None or root not in origin.parents, (name, origin)\n"
        "hf = importlib.util.find_spec('kernels')\n"
        "if importlib.util.find_spec('transformers'):\n"
        "    assert hf.origin and 'site-packages' in hf.origin, hf\n"
        "print('ok')", cwd)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers is not installed (dev extra)")
@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_transformers_imports_in_the_same_process_as_minipipe(where, tmp_path):
    cwd = ROOT if where == "root" else tmp_path
    out = _python("import minipipe.kernels.ops, minipipe.models.registry\n"
                  "from transformers import GPT2LMHeadModel\n"
                  "import minipipe.checkpoint.hf_gpt2\nprint('ok')", cwd)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_export_command_runs_from_another_directory(tmp_path):
    out = subprocess.run([sys.executable, "-m", "minipipe.export", "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "checkpoint" in out.stdout, out.stderr


def test_the_wheel_holds_nothing_outside_minipipe(tmp_path):
    """A non-editable install writes only minipipe/ and its dist-info into site-packages."""
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--quiet", "-w", str(tmp_path), str(ROOT)],
                           capture_output=True, text=True, timeout=300)
    if built.returncode != 0 and "No module named" in built.stderr:
        pytest.skip(f"cannot build a wheel without isolation here: {built.stderr.strip()[-200:]}")
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("minipipe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"minipipe", next(t for t in tops if t.endswith(".dist-info"))}, tops
    for expected in ("minipipe/kernels/ops.py", "minipipe/kernels/flash_attention.py",
                     "minipipe/models/registry.py", "minipipe/models/transformer.py",
                     "minipipe/pipeline/engine.py", "minipipe/schedule/__main__.py",
                     "minipipe/checkpoint/files.py", "minipipe/tracking/timeline.py"):
        assert expected in names, f"{expected} missing from the wheel"
