"""minipipe: a compact GPipe trainer (fill-drain pipeline, re-materialisation, Triton kernels).

One import root. The repository keeps `kernels/` and `models/` at its top level, but they are
imported only as `minipipe.kernels` and `minipipe.models`: neither folder has an `__init__.py`,
so from the repository root `import kernels` never finds them first (a folder without one is a
PEP 420 namespace portion, and a regular package later on sys.path, such as Hugging Face's
`kernels`, wins). An installed wheel holds them as `minipipe/kernels/` and `minipipe/models/`
(pyproject's package-dir); in a checkout (editable install included) this package adds the
checkout root to its own search path, so `minipipe.kernels` resolves to the top-level folder.
"""
from pathlib import Path

_here = Path(__file__).resolve().parent
_checkout = _here.parent
# Only in a minipipe checkout: in site-packages the parent holds other projects' folders.
if (not (_here / "kernels").is_dir() and (_checkout / "pyproject.toml").is_file()
        and (_checkout / "kernels" / "ops.py").is_file() and (_checkout / "models" / "registry.py").is_file()):
    __path__.append(str(_checkout))
