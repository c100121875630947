"""A checkpoint or an --init-from directory is untrusted input: every file opened from it lies
inside it (absolute names, `..` and symlinks out are refused naming the entry, and the outside
file is never opened), trainer_state.json and GPT-2's config.json are checked field by field, and
a tensor of another dtype or with NaN/inf is refused as corrupt, never cast or trained on. Each
refusal is exit code 2 with one `minipipe error` line, before any step, with the files untouched."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import train
from minipipe.checkpoint import files
from minipipe.export import export
from tests import conftest
from tests.conftest import TINY_FLAGS
from tests.opened_files import opened_files, under
from tests.test_bad_inputs import _tree, refused

SHARD = "model-00001-of-00001.safetensors"
OPTIMIZER_SHARD = "optimizer-00001-of-00001.safetensors"
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 2-step tiny run's checkpoint, and its GPT-2 export: {"ckpt": step dir, "hf": dir}."""
    root = tmp_path_factory.mktemp("saved")
    assert train.main([*TINY_FLAGS, "--ckpt-dir", str(root / "ckpt")]) == 0
    export(root / "ckpt", root / "hf", format="hf")
    return {"ckpt": root / "ckpt" / "step-000002", "hf": root / "hf"}


@pytest.fixture
def cli_importing(cli, monkeypatch):
    """cli without the tiny model-shape flags: the --init-from config.json sets the shape."""
    shape = {"--layers", "--d-model", "--heads", "--max-seq-len"}
    flags = [f for i, f in enumerate(TINY_FLAGS) if f not in shape and TINY_FLAGS[i - 1] not in shape]
    monkeypatch.setattr(conftest, "TINY_FLAGS", flags)
    return cli


def _bait(tmp_path):
    """A valid safetensors file outside every named directory: reading it would be the bug."""
    bait = tmp_path / "outside"
    bait.mkdir()
    save_file({"x": torch.zeros(1)}, bait / "secret.safetensors")
    return bait


def _edit_state(step_dir, edit):
    state = json.loads((step_dir / "trainer_state.json").read_text())
    edit(state)
    (step_dir / "trainer_state.json").write_text(json.dumps(state))


def _record(step_dir, name):
    """Make trainer_state.json agree with the file `name` as it now is: an attacker's best case."""
    _edit_state(step_dir, lambda state: state["files"].update({name: files.digest(step_dir / name)}))


def _edit_index(step_dir, edit):
    index = json.loads((step_dir / INDEX).read_text())
    edit(index["weight_map"])
    (step_dir / INDEX).write_text(json.dumps(index))
    _record(step_dir, INDEX)


def _edit_shard(step_dir, name, edit):
    tensors = load_file(step_dir / name)
    edit(tensors)
    save_file(tensors, step_dir / name, metadata={"format": "pt"})
    _record(step_dir, name)


def _resume(cli, tmp_path, step_dir):
    return cli("--ckpt-dir", tmp_path / "new", "--resume", step_dir, "--steps", 3)


# ---- nothing is read outside the named directory -----------------------------------------------
@pytest.mark.parametrize("case", ["absolute path in the index", "`..` in the index",
                                  "shard symlinked out", "latest names a step symlinked out"])
def test_a_checkpoint_cannot_point_a_read_outside_itself(cli, saved, tmp_path, case):
    bait = _bait(tmp_path)
    ckpt = tmp_path / "ckpt"
    step = ckpt / "step-000002"
    shutil.copytree(saved["ckpt"], step)
    target = step
    if case == "absolute path in the index":
        _edit_index(step, lambda wm: wm.update({"layers.0.tokens.weight": str(bait / "secret.safetensors")}))
    elif case == "`..` in the index":
        _edit_index(step, lambda wm: wm.update({"layers.0.tokens.weight": "../../outside/secret.safetensors"}))
    elif case == "shard symlinked out":
        shutil.copy(step / SHARD, bait / SHARD)
        (step / SHARD).unlink()
        (step / SHARD).symlink_to(bait / SHARD)
    else:
        shutil.move(step, bait / "step-000002")
        step.symlink_to(bait / "step-000002")
        (ckpt / "latest").write_text("step-000002\n")
        target = ckpt
    before = _tree(tmp_path)
    with opened_files() as opened:
        line = refused(_resume(cli, tmp_path, target), "lies outside")
    assert under(opened, bait) == [], under(opened, bait)
    assert _tree(tmp_path) == before
    assert "only files inside the directory are read" in line


@pytest.mark.parametrize("latest", ["../outside/step-000002", "/etc", "step-2/../../x", ""])
def test_latest_names_only_a_step_directory_beside_it(cli, saved, tmp_path, latest):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(saved["ckpt"], ckpt / "step-000002")
    (ckpt / "latest").write_text(latest + "\n")
    refused(cli("--ckpt-dir", ckpt, "--steps", 3), "latest names", "not a step-N directory")


@pytest.mark.parametrize("case", ["absolute path in the index", "`..` in the index",
                                  "config.json symlinked out"])
def test_an_init_from_directory_cannot_point_a_read_outside_itself(cli_importing, saved, tmp_path, case):
    bait = _bait(tmp_path)
    hf = tmp_path / "hf"
    shutil.copytree(saved["hf"], hf)
    if case == "config.json symlinked out":
        shutil.move(hf / "config.json", bait / "config.json")
        (hf / "config.json").symlink_to(bait / "config.json")
    else:
        names = load_file(hf / "model.safetensors")
        outside = str(bait / "secret.safetensors") if case.startswith("absolute") else "../outside/secret.safetensors"
        weight_map = {name: "model.safetensors" for name in names}
        weight_map["transformer.wte.weight"] = outside
        (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    before = _tree(tmp_path)
    with opened_files() as opened:
        refused(cli_importing("--init-from", hf), "lies outside")
    assert under(opened, bait) == []
    assert _tree(tmp_path) == before


# ---- trainer_state.json: one schema, checked before any value is used ---------------------------
@pytest.mark.parametrize("field,value,needle", [
    ("step", -1, "step must be an integer >= 0"),
    ("step", "1", "step must be an integer >= 0"),
    ("step", True, "step must be an integer >= 0"),
    ("step", 1.5, "step must be an integer >= 0"),
    ("lr", "NaN", "lr must be a finite number"),
    ("config", [1, 2], "config must be an object"),
    ("world", {"stages": "1", "dp": 1}, "world must be"),
    ("world", [1, 1], "world must be"),
    ("data_cursor", {"position": -3, "dataset": "synthetic"}, "data_cursor must be"),
    ("rng", [], "rng must be one saved RNG state per rank (1)"),
    ("rng", [{"torch": "AAAA", "cuda": None}], "rng must be one saved RNG state per rank"),
    ("rng", [{"torch": "not base64!", "cuda": None}], "rng must be"),
    ("files", [], "files must be an object"),
    ("files", {SHARD: {"sha256": "0" * 63, "bytes": 1}}, "must be an object {\"sha256\""),
    ("files", {"../x": {"sha256": "0" * 64, "bytes": 1}}, "a files entry must be a plain file name"),
    ("loss_scale", [float("inf"), 0], "loss_scale must be"),
    ("balance", [2, 0], "balance must be a list of layer counts >= 1"),
])
def test_every_trainer_state_field_is_checked_by_type_and_range(cli, saved, tmp_path, field, value, needle):
    step = tmp_path / "step-000002"
    shutil.copytree(saved["ckpt"], step)
    _edit_state(step, lambda state: state.update({field: value}))
    before = _tree(tmp_path)
    refused(_resume(cli, tmp_path, step), "trainer_state.json", needle, "corrupt or was edited")
    assert _tree(tmp_path) == before


def test_a_short_rng_list_is_refused_before_any_rank_reads_it(cli, saved, tmp_path):
    """Two ranks' world with one RNG record: torch.set_rng_state on rank 1 would abort."""
    step = tmp_path / "step-000002"
    shutil.copytree(saved["ckpt"], step)
    _edit_state(step, lambda state: state.update(world={"stages": 2, "dp": 1}))
    refused(_resume(cli, tmp_path, step), "rng must be one saved RNG state per rank (2)")


@pytest.mark.parametrize("shard,name,edit,needle", [
    (SHARD, "layers.1.qkv.weight", lambda t: t.double(), "is stored as F64, but this checkpoint saves it as F32"),
    (SHARD, "layers.1.qkv.weight", lambda t: t.half(), "is stored as F16"),
    (OPTIMIZER_SHARD, "layers.1.qkv.weight.step", lambda t: t.long(), "is stored as I64"),
    (SHARD, "layers.2.fc.bias", lambda t: t.fill_(float("nan")), "holds NaN or infinite values"),
    (OPTIMIZER_SHARD, "layers.1.fc.weight.exp_avg_sq", lambda t: t.fill_(float("inf")),
     "holds NaN or infinite values"),
])
def test_a_tensor_of_another_dtype_or_not_finite_is_corrupt_not_cast(cli, saved, tmp_path, shard, name, edit, needle):
    step = tmp_path / "step-000002"
    shutil.copytree(saved["ckpt"], step)
    _edit_shard(step, shard, lambda tensors: tensors.update({name: edit(tensors[name])}))
    before = _tree(tmp_path)
    refused(_resume(cli, tmp_path, step), name, needle)
    assert _tree(tmp_path) == before


# ---- GPT-2's config.json: one schema ------------------------------------------------------------
@pytest.mark.parametrize("key,value,needle", [
    ("n_layer", True, "n_layer = True"),
    ("n_layer", 1, "the weights hold block transformer.h.1, but config.json has n_layer = 1"),
    ("n_layer", 2.0, "n_layer = 2.0"),
    ("n_layer", 10**9, "n_layer an integer in 1.."),
    ("n_layer", 10**6, "n_layer = 1000000, but the weights hold no transformer.h.999999.ln_1.weight"),
    ("n_positions", 10**6, "n_positions x n_embd = [1000000, 16], but transformer.wpe.weight"),
    ("vocab_size", 4096, "vocab_size x n_embd = [4096, 16]"),
    ("n_embd", "16", "n_embd = '16'"),
    ("n_head", 3, "n_embd divisible by n_head = 3"),
    ("n_inner", True, "n_inner = True"),
    ("scale_attn_weights", 1, "scale_attn_weights = true only"),
    ("scale_attn_by_inverse_layer_idx", 0, "scale_attn_by_inverse_layer_idx = false only"),
    ("tie_word_embeddings", "false", "tie_word_embeddings true or false"),
    ("layer_norm_epsilon", "1e-5", "layer_norm_epsilon = 1e-05 only"),
])
def test_every_gpt2_config_field_is_checked_by_type_and_range(cli_importing, saved, tmp_path, key, value, needle):
    hf = tmp_path / "hf"
    shutil.copytree(saved["hf"], hf)
    config = json.loads((hf / "config.json").read_text())
    config[key] = value
    (hf / "config.json").write_text(json.dumps(config))
    before = _tree(tmp_path)
    line = refused(cli_importing("--init-from", hf), "config.json", needle)
    assert "--layers" not in line and "--d-model" not in line  # the field, not flags never passed
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("content", ["[1, 2]", "{\"model_type\": \"gpt2\"", "\"gpt2\""])
def test_a_gpt2_config_that_is_not_an_object(cli_importing, saved, tmp_path, content):
    hf = tmp_path / "hf"
    shutil.copytree(saved["hf"], hf)
    (hf / "config.json").write_text(content)
    refused(cli_importing("--init-from", hf), "config.json")


def test_nan_in_imported_weights_is_a_corrupt_input(cli_importing, saved, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(saved["hf"], hf)
    tensors = load_file(hf / "model.safetensors")
    tensors["transformer.h.0.mlp.c_fc.bias"][3] = float("nan")
    save_file(tensors, hf / "model.safetensors")
    line = refused(cli_importing("--init-from", hf), "transformer.h.0.mlp.c_fc.bias holds NaN", "corrupt")
    assert "--lr" not in line


def test_the_untouched_checkpoint_still_resumes(cli, saved, tmp_path):
    """The checks refuse edits, not the files minipipe writes."""
    step = tmp_path / "step-000002"
    shutil.copytree(saved["ckpt"], step)
    assert _resume(cli, tmp_path, step)[0] == 0


def test_the_untouched_export_still_imports(cli_importing, saved):
    assert cli_importing("--init-from", saved["hf"])[0] == 0
