"""Property: whatever a checkpoint's trainer_state.json or index, or a GPT-2 config.json, is edited
to hold (wrong types, out-of-range values, missing keys, paths out of the directory), the run
either trains correctly or exits 2 with one `minipipe error` line; no file outside the named
directories is opened; nothing the user made changes. Hypothesis draws the edits (derandomized:
the same examples every run, a fixed number of them); each run is train.main in this process.
Outcomes are tallied per target and printed (pytest -s shows them)."""
import collections
import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import train
from minipipe.checkpoint import files
from minipipe.export import export
from tests.conftest import TINY_FLAGS
from tests.opened_files import opened_files, under
from tests.test_bad_inputs import _tree

EXAMPLES = 40  # per target: about a second each on one core
SHARD = "model-00001-of-00001.safetensors"
SHAPE_FLAGS = {"--layers", "--d-model", "--heads", "--max-seq-len"}
IMPORT_FLAGS = [f for i, f in enumerate(TINY_FLAGS) if f not in SHAPE_FLAGS and TINY_FLAGS[i - 1] not in SHAPE_FLAGS]
OUTCOMES: dict = collections.defaultdict(collections.Counter)  # target -> outcome -> count

# Where an edit can point a path: outside by absolute name, by `..`, or at the bait itself.
PATHS = ["/etc/passwd", "/dev/zero", "../outside/secret.safetensors", "../../outside/secret.safetensors",
         "BAIT", "", ".", "..", "step-000002", SHARD, "trainer_state.json", "a/b.safetensors", "\0x"]
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([-1, 0, 1, 2, 3, 16, 256]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(PATHS),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
STATE_KEYS = [("step",), ("lr",), ("config",), ("config", "dtype"), ("config", "layers"),
              ("config", "seed"), ("config", "batch_size"), ("world",), ("world", "stages"),
              ("world", "dp"), ("data_cursor",), ("data_cursor", "position"),
              ("data_cursor", "dataset"), ("rng",), ("rng", 0), ("rng", 0, "torch"), ("rng", 0, "cuda"),
              ("files",), ("files", SHARD), ("files", SHARD, "bytes"), ("files", SHARD, "sha256"),
              ("loss_scale",), ("loss_scale", 0), ("format_version",), ("balance",)]
INDEX_KEYS = [("weight_map",), ("weight_map", "layers.0.tokens.weight"),
              ("weight_map", "layers.3.proj.weight"), ("metadata",)]
GPT2_KEYS = [(key,) for key in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size", "model_type",
                                "activation_function", "layer_norm_epsilon", "n_inner",
                                "tie_word_embeddings", "scale_attn_weights",
                                "scale_attn_by_inverse_layer_idx")]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    assert train.main([*TINY_FLAGS, "--ckpt-dir", str(root / "ckpt")]) == 0
    export(root / "ckpt", root / "hf", format="hf")
    yield {"ckpt": root / "ckpt" / "step-000002", "hf": root / "hf"}
    for target, counts in sorted(OUTCOMES.items()):
        print(f"mutated {target}: {sum(counts.values())} inputs, {dict(sorted(counts.items()))}")


def _edit(document, keys: tuple, value, delete: bool, bait: Path):
    """document with the entry at `keys` replaced by value (BAIT: the bait's absolute path) or
    deleted; an entry whose parent is not a container is left as it is."""
    value = str(bait / "secret.safetensors") if value == "BAIT" else value
    parent = document
    for key in keys[:-1]:
        if not isinstance(parent, (dict, list)) or (isinstance(parent, list) and key >= len(parent)):
            return document
        parent = parent[key]
    last = keys[-1]
    if isinstance(parent, list) and last >= len(parent) or not isinstance(parent, (dict, list)):
        return document
    if delete and isinstance(parent, dict):
        parent.pop(last, None)
    else:
        parent[last] = value
    return document


def _run(flags: list, base_flags: list) -> tuple[int, str]:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = train.main([*base_flags, *map(str, flags)])
    return code, stderr.getvalue()


def _check_outcome(target: str, code: int, err: str, new_ckpt: Path) -> None:
    errors = [line for line in err.splitlines() if line.startswith("minipipe error")]
    assert "Traceback" not in err, err
    if code == 2:
        assert len(errors) == 1, err
        OUTCOMES[target]["refused"] += 1
        return
    assert code == 0 and not errors, (code, err)
    # A correct run: whatever it saved is a complete checkpoint whose every tensor is finite.
    if (new_ckpt / "latest").exists():
        step = files.checkpoint_path(new_ckpt)
        state = files.read_trainer_state(step)
        for kind in files.INDEX_FILES:
            weight_map = files.read_index(step, kind, state)
            files.read_tensors(step, kind, weight_map, state, dict.fromkeys(weight_map))
    OUTCOMES[target]["ran"] += 1


def _property(pristine, target: str, keys: tuple, value, delete: bool, rerecord: bool) -> None:
    """One edited copy, run in a fresh directory; the three properties checked."""
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        bait = root / "outside"
        bait.mkdir()
        save_file({"x": torch.zeros(1)}, bait / "secret.safetensors")
        (root / "notes.txt").write_text("the user's\n")
        new_ckpt = root / "new-ckpt"
        if target == "gpt2 config.json":
            named = root / "hf"
            shutil.copytree(pristine["hf"], named)
            file = named / "config.json"
            flags, base = ["--init-from", named, "--ckpt-dir", new_ckpt, "--steps", 1], IMPORT_FLAGS
        else:
            named = root / "ckpt" / "step-000002"
            shutil.copytree(pristine["ckpt"], named)
            file = named / ("trainer_state.json" if target == "trainer_state.json" else files.INDEX_FILES["model"])
            flags, base = ["--ckpt-dir", new_ckpt, "--resume", named, "--steps", 3], TINY_FLAGS
        document = _edit(json.loads(file.read_text()), keys, value, delete, bait)
        file.write_text(json.dumps(document))
        if target == "model index" and rerecord:  # an attacker who also fixes the recorded digest
            state = json.loads((named / "trainer_state.json").read_text())
            state["files"][file.name] = files.digest(file)
            (named / "trainer_state.json").write_text(json.dumps(state))
        before = _tree(root)
        with opened_files() as opened:
            code, err = _run(flags, base)
        outside = [p for p in under(opened, root) if not (under([p], named) or under([p], new_ckpt))]
        assert outside == [], (target, keys, value, outside)
        injected = [v for v in (value,) if isinstance(v, str) and v.startswith("/") and "\0" not in v]
        assert not [p for p in opened if p in injected], (target, keys, value)
        assert {k: v for k, v in _tree(root).items() if not k.startswith("new-ckpt")} == before
        _check_outcome(target, code, err, new_ckpt)


SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@SETTINGS
@given(keys=st.sampled_from(STATE_KEYS), value=VALUES, delete=st.booleans())
def test_an_edited_trainer_state_trains_correctly_or_is_refused(pristine, keys, value, delete):
    _property(pristine, "trainer_state.json", keys, value, delete, rerecord=False)


@SETTINGS
@given(keys=st.sampled_from(INDEX_KEYS), value=VALUES, delete=st.booleans(), rerecord=st.booleans())
def test_an_edited_index_trains_correctly_or_is_refused(pristine, keys, value, delete, rerecord):
    _property(pristine, "model index", keys, value, delete, rerecord)


@SETTINGS
@given(keys=st.sampled_from(GPT2_KEYS), value=VALUES, delete=st.booleans())
def test_an_edited_gpt2_config_trains_correctly_or_is_refused(pristine, keys, value, delete):
    _property(pristine, "gpt2 config.json", keys, value, delete, rerecord=False)

