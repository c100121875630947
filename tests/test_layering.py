"""The import direction a newcomer can rely on: kernels <- models <- minipipe (engine, trainer),
and model-family facts declared by each family, never branched on outside models/."""
import ast
import re
from pathlib import Path

from minipipe import config, presets
from minipipe.kernels import runtime
from minipipe.models import registry

ROOT = Path(__file__).resolve().parent.parent
# Modules that run a step: they see layers only through the layer contract and running_stats.
# Modules that run a step: they see layers only through the layer contract and running_stats.
ENGINE = sorted([*(ROOT / "minipipe" / "pipeline").glob("*.py"), *(ROOT / "minipipe" / "schedule").glob("*.py"),
                 ROOT / "minipipe" / "tracking" / "timeline.py"])
MAY_NAME_A_FAMILY = {"minipipe/config.py", "minipipe/presets.py", "minipipe/checkpoint/hf_gpt2.py",
                     "minipipe/export.py"}


def imported_packages(path: Path) -> set[str]:
    """The packages a file imports, minipipe's own parts named as such: `minipipe.kernels`,
    `minipipe.models`, or `minipipe` for the trainer."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module]
            if node.module == "minipipe":
                modules = [f"minipipe.{alias.name}" for alias in node.names]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            own_part = parts[0] == "minipipe" and len(parts) > 1 and parts[1] in ("kernels", "models")
            names.add(".".join(parts[:2]) if own_part else parts[0])
    return names


def test_kernels_and_models_never_import_the_trainer():
    for package in ("kernels", "models"):
        for path in sorted((ROOT / package).glob("*.py")):
            assert "minipipe" not in imported_packages(path), f"{path.relative_to(ROOT)} imports the trainer"
    for path in sorted((ROOT / "kernels").glob("*.py")):
        assert "minipipe.models" not in imported_packages(path), f"{path.relative_to(ROOT)} imports models"


def test_the_top_level_folders_are_not_packages_of_their_own():
    """`kernels` and `models` are other projects' names (Hugging Face's kernels package is a
    transformers dependency): an __init__.py would make the repository root's folder win."""
    for package in ("kernels", "models"):
        assert not (ROOT / package / "__init__.py").exists()
        for path in sorted((ROOT / package).glob("*.py")):
            assert not {"kernels", "models"} & imported_packages(path), f"{path} imports a bare name"


def test_the_engine_does_not_import_model_code():
    assert len(ENGINE) > 10
    for path in ENGINE:
        assert "minipipe.models" not in imported_packages(path), f"{path.relative_to(ROOT)} imports models"


def test_schedules_are_torch_free():
    for path in sorted((ROOT / "minipipe" / "schedule").glob("*.py")):
        assert "torch" not in imported_packages(path), f"{path.relative_to(ROOT)} imports torch"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] in ("kernels", "models"):
        parts.insert(0, "minipipe")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _own_imports(path: Path, modules: set[str]) -> set[str]:
    """Every minipipe module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in modules}


def test_no_import_circle_in_the_package():
    paths = [*(ROOT / "minipipe").rglob("*.py"), *(ROOT / "kernels").glob("*.py"),
             *(ROOT / "models").glob("*.py")]
    graph = {_module_name(p): p for p in paths}
    edges = {name: _own_imports(path, set(graph)) - {name} for name, path in graph.items()}
    state, stack = {}, []

    def visit(name):  # depth-first; a grey node met again closes a circle
        state[name] = "grey"
        stack.append(name)
        for nxt in sorted(edges[name]):
            if state.get(nxt) == "grey":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[name] = "black"
    assert "minipipe.pipeline.engine" in edges and "minipipe.kernels.ops" in edges
    for name in sorted(edges):
        if name not in state:
            visit(name)


def test_the_tied_weight_is_named_by_its_family_only():
    """Which layers and parameters share a weight is the family's TiedWeight: the code that builds,
    counts, stores and trains it names no model's parameter, so a new tied family changes none of it."""
    for path in [ROOT / "minipipe" / "layers.py", *sorted((ROOT / "minipipe" / "pipeline").glob("*.py"))]:
        code = path.read_text()
        for name in ("tokens.weight", "proj.weight", "cfg.layers", ".tokens", ".proj"):
            assert name not in code, f"{path.relative_to(ROOT)} names {name!r}"


def test_no_family_branches_outside_models():
    pattern = re.compile(r"cfg\.model\s*(==|!=|in\b)|model\s*==\s*[\"'](transformer|amoebanet)")
    for path in sorted([ROOT / "train.py", *(ROOT / "minipipe").rglob("*.py")]):
        where = str(path.relative_to(ROOT))
        if where not in MAY_NAME_A_FAMILY:
            assert not pattern.search(path.read_text()), f"{where} branches on the model family"


def test_every_family_has_presets_and_each_choice_list_one_meaning():
    assert list(registry.FAMILIES) == list(presets.MODEL_FAMILIES)
    # the kernel library cannot import the config (nor the config torch): equal by test instead
    assert config.KERNEL_BACKENDS == runtime.BACKENDS
