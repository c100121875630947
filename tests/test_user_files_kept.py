"""Nothing a user made is deleted, moved or overwritten: re-saving a step keeps a directory that
holds a user's files (refused by name before training) and replaces one of minipipe's own only
once the new step is complete; a leftover-looking name with a user's file in it survives a save;
a full disk while writing `latest` leaves it naming a complete step; an export never writes into
a non-empty directory unless told to, and then replaces it whole."""
import errno
import json
import os

import pytest

from minipipe.checkpoint import checkpointer
from minipipe.export import main as export_main
from tests.test_bad_inputs import _tree, refused


def _steps(ckpt) -> list:
    return sorted(p.name for p in ckpt.iterdir())


def test_resaving_a_step_that_holds_a_users_file_is_refused_before_training(cli, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert cli("--ckpt-dir", ckpt, "--steps", 3, "--ckpt-every", 1, "--keep", 0)[0] == 0
    (ckpt / "step-000003" / "notes.txt").write_text("mine\n")
    before = _tree(tmp_path)
    refused(cli("--ckpt-dir", ckpt, "--resume", ckpt / "step-000001", "--steps", 3),
            "would save step-000003 again", "files minipipe did not write", "move those files out")
    assert _tree(tmp_path) == before


def test_resaving_a_step_of_minipipes_own_replaces_it_once_the_new_one_is_complete(cli, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert cli("--ckpt-dir", ckpt, "--steps", 3, "--ckpt-every", 1, "--keep", 0)[0] == 0
    old_state = (ckpt / "step-000003" / "trainer_state.json").read_text()
    assert cli("--ckpt-dir", ckpt, "--resume", ckpt / "step-000001", "--steps", 3, "--lr", "0.002",
               "--ckpt-every", 1, "--keep", 0)[0] == 0
    assert _steps(ckpt) == ["latest", "step-000001", "step-000002", "step-000003"]
    new_state = json.loads((ckpt / "step-000003" / "trainer_state.json").read_text())
    assert new_state["config"]["lr"] == 0.002 and json.loads(old_state)["config"]["lr"] != 0.002


@pytest.mark.parametrize("name", [".old-step-000002", ".tmp-step-000002"])
def test_a_users_directory_with_a_leftovers_name_survives_a_save(cli, tmp_path, name):
    ckpt = tmp_path / "ckpt"
    (ckpt / name).mkdir(parents=True)
    (ckpt / name / "notes.txt").write_text("mine\n")
    result = cli("--ckpt-dir", ckpt, "--steps", 2, "--ckpt-every", 1, "--keep", 1)
    assert (ckpt / name / "notes.txt").read_text() == "mine\n"
    if name.startswith(".tmp"):  # the save of step 2 cannot start there: refused by name
        refused(result, f"cannot save into {ckpt / name}", "files minipipe did not write")
    else:
        assert result[0] == 0
        assert (ckpt / "latest").read_text().strip() == "step-000002"


def test_a_full_disk_while_writing_latest_leaves_it_naming_a_complete_step(cli, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    assert cli("--ckpt-dir", ckpt, "--steps", 1)[0] == 0
    real_replace = os.replace

    def no_space_for_latest(src, dst):
        if str(dst).endswith("latest"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)
    monkeypatch.setattr(checkpointer.os, "replace", no_space_for_latest)
    refused(cli("--ckpt-dir", ckpt, "--steps", 2), "No space left on device",
            "`latest` still names step-000001", f"--resume {ckpt / 'step-000002'}")
    assert (ckpt / "latest").read_text().strip() == "step-000001"
    assert not (ckpt / "latest.tmp").exists()
    assert (ckpt / "step-000001" / "trainer_state.json").is_file()


# ---- export --------------------------------------------------------------------------------------
@pytest.fixture
def ckpt(cli, tmp_path):
    assert cli("--ckpt-dir", tmp_path / "ckpt", "--steps", 1)[0] == 0
    return tmp_path / "ckpt"


@pytest.mark.parametrize("format", ["minipipe", "hf"])
def test_export_refuses_a_non_empty_destination(ckpt, tmp_path, capsys, format):
    out = tmp_path / "gpt2"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "gpt2"}\n')
    (out / "tokenizer.json").write_text("{}\n")
    before = _tree(tmp_path)
    assert export_main([str(ckpt), str(out), "--format", format]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("minipipe error: ") and "is not empty" in line and "--overwrite" in line
    assert _tree(tmp_path) == before


def test_export_overwrite_replaces_the_destination_whole(ckpt, tmp_path):
    out = tmp_path / "gpt2"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "gpt2"}\n')
    (out / "tokenizer.json").write_text("{}\n")
    assert export_main([str(ckpt), str(out), "--format", "hf", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no mix
    assert json.loads((out / "config.json").read_text())["n_layer"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "gpt2"]  # nothing left beside


@pytest.mark.parametrize("where", ["the ckpt-dir", "the step", "inside the step"])
def test_export_never_replaces_the_checkpoint_it_reads(ckpt, tmp_path, capsys, where):
    out = {"the ckpt-dir": ckpt, "the step": ckpt / "step-000001",
           "inside the step": ckpt / "step-000001" / "export"}[where]
    before = _tree(tmp_path)
    assert export_main([str(ckpt), str(out), "--overwrite"]) == 2
    assert "export to a directory outside it" in capsys.readouterr().err
    assert _tree(tmp_path) == before


def test_export_into_an_empty_or_new_directory(ckpt, tmp_path):
    (tmp_path / "empty").mkdir()
    assert export_main([str(ckpt), str(tmp_path / "empty")]) == 0
    assert export_main([str(ckpt), str(tmp_path / "new" / "deeper")]) == 0
    for out in (tmp_path / "empty", tmp_path / "new" / "deeper"):
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
