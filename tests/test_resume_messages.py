"""A run says what it did: a resume with nothing left to train, a re-planned learning-rate
schedule, a step limit that stops a run early as --steps would, a sample from a finished job."""
import json

import pytest

import train
from minipipe.config import make_config
from minipipe.pipeline.optim import lr_at
from tests.conftest import TINY_FLAGS


def _tiny_cfg(**overrides):
    flags = dict(zip(TINY_FLAGS[::2], TINY_FLAGS[1::2]))
    values = {flag[2:].replace("-", "_"): value for flag, value in flags.items()}
    values = {k: (v if not v.isdigit() else int(v)) for k, v in values.items()}
    return make_config(**{**values, "model": "transformer", **overrides})


@pytest.fixture
def run(capsys):
    """run(*flags) -> (exit code, stdout, stderr) of train.main after the tiny flags."""
    def run_main(*flags):
        code = train.main([*TINY_FLAGS, *map(str, flags)])
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run_main


def test_a_finished_job_says_so_exits_0_and_samples_from_its_checkpoint(run, tmp_path):
    ckpt = tmp_path / "ckpt"
    code, trained, _ = run("--ckpt-dir", ckpt, "--sample", 6)
    assert code == 0
    code, resumed, _ = run("--ckpt-dir", ckpt, "--sample", 6)
    assert code == 0
    assert "nothing to train: the checkpoint already holds step 2 of --steps 2" in resumed
    assert "loss" not in resumed  # no step ran
    sample = trained[trained.index("--- sample"):]
    assert sample == resumed[resumed.index("--- sample"):]  # the same weights, the same seed


def test_a_changed_steps_on_resume_reports_the_new_schedule(run, tmp_path):
    ckpt, jsonl = tmp_path / "ckpt", tmp_path / "m.jsonl"
    assert run("--ckpt-dir", ckpt, "--warmup", 1)[0] == 0
    code, out, _ = run("--ckpt-dir", ckpt, "--warmup", 1, "--steps", 5, "--metrics-jsonl", jsonl)
    assert code == 0
    now, before = lr_at(2, _tiny_cfg(warmup=1, steps=5)), lr_at(2, _tiny_cfg(warmup=1, steps=2))
    assert now != before
    assert (f"the checkpoint's run had --steps 2, this one --steps 5: the cosine learning-rate "
            f"schedule now reaches --min-lr 0.0001 at step 5 instead of 2, so step 3 trains at lr "
            f"{now:.3e} (it would have been {before:.3e})") in out
    first_logged = json.loads(jsonl.read_text().splitlines()[0])
    assert first_logged["lr"] == pytest.approx(now, rel=1e-12)


def test_the_step_limit_stops_like_steps_and_resumes_to_the_same_losses(cli, tmp_path, monkeypatch):
    straight = tmp_path / "straight.jsonl"
    assert cli("--steps", 4, "--metrics-jsonl", straight)[0] == 0
    ckpt, parts = tmp_path / "ckpt", [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    monkeypatch.setenv(train.STEP_LIMIT_ENV, "2")
    for part in parts:
        assert cli("--steps", 4, "--ckpt-dir", ckpt, "--metrics-jsonl", part)[0] == 0
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-000002", "step-000004"]
    losses = [[json.loads(line)["loss"] for line in path.read_text().splitlines()]
              for path in (straight, *parts)]
    assert losses[0] == losses[1] + losses[2]  # the schedule is --steps 4's throughout
    monkeypatch.setenv(train.STEP_LIMIT_ENV, "0")
    code, line, _ = cli("--steps", 4)
    assert code == 2 and line == (f"minipipe error: {train.STEP_LIMIT_ENV}='0': give a number of "
                                  f"steps >= 1, or unset it")
