"""Experiment tracking: one logger interface carries the config and every value to each backend;
wandb runs offline without a key or network, and `--wandb disabled` writes nothing."""
import glob
import time

import pytest
import wandb

import train
from minipipe.config import Config, make_config
from minipipe.tracking.metrics import MetricsLogger, WandbBackend, wandb_mode

TINY = dict(model="transformer", layers=2, d_model=32, heads=2, seq_len=32, data="synthetic",
            batch_size=8, microbatches=2, steps=4, log_every=2, eval_every=0, eval_batches=1)
STEP_FIELDS = {"loss": float, "lr": float, "grad_norm": float, "step_time_s": float,
               "tokens_per_s": float}
INTERVAL_FIELDS = {"bubble_measured": float, "bubble_theory": float, "peak_mem_gib/stage0": float,
                   "tflops_per_device": float}


class RecordingBackend:
    def __init__(self):
        self.configs, self.records, self.closed = [], [], False

    def config(self, values):
        self.configs.append(values)

    def log(self, step, values):
        self.records.append((step, dict(values)))

    def close(self):
        self.closed = True


def test_config_plan_and_every_value_reach_every_backend(tmp_path):
    backends = [RecordingBackend(), RecordingBackend()]
    train.train(make_config(**TINY, out_dir=str(tmp_path)), logger=MetricsLogger(backends))
    first, second = backends
    assert first.configs == second.configs and first.records == second.records and first.closed
    config = first.configs[0]
    assert set(Config.__dataclass_fields__) <= set(config)
    assert config["plan"]["balance"] == [4] and config["plan"]["stage_params"][0] > 0
    assert [step for step, _ in first.records] == [1, 2, 3, 4]  # one record per step, from 1
    for step, values in first.records:
        expected = {**STEP_FIELDS, **(INTERVAL_FIELDS if step in (2, 4) else {})}
        for key, kind in expected.items():
            assert isinstance(values[key], kind), (step, key, values)
    assert isinstance(first.records[-1][1]["val_loss"], float)  # validation at the end


def test_wandb_offline_writes_its_run_under_out_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    train.train(make_config(**TINY, out_dir=str(out), wandb="offline", wandb_group="g",
                            run_name="smoke"))
    assert glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert not (tmp_path / "wandb").exists()


def test_wandb_disabled_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train.train(make_config(**TINY, out_dir=str(tmp_path / "out"), wandb="disabled"))
    assert not glob.glob(str(tmp_path / "**" / "wandb"), recursive=True)


def test_auto_is_online_only_with_an_api_key(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode("auto") == "offline"  # no key, no netrc file
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") == "disabled" and wandb_mode("offline") == "offline"


def test_failed_online_init_falls_back_to_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # online without a key fails at once
    out = tmp_path / "out"
    train.train(make_config(**{**TINY, "steps": 1}, out_dir=str(out), wandb="online"))
    assert "logging offline instead" in capsys.readouterr().err
    assert glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))


def _unreachable_worker(rank, world_size, out_dir):
    """wandb.init that blocks as long as its init_timeout allows, then fails (an unreachable
    server); records whether any process group existed when rank 0 started tracking."""
    import time

    import torch.distributed as dist
    import wandb
    seen = {}
    real_init = wandb.init

    def unreachable(mode, settings, **kwargs):
        if mode == "online":
            seen.update(group_started=dist.is_initialized(), timeout=settings.init_timeout)
            time.sleep(settings.init_timeout)
            raise wandb.errors.CommError("server unreachable")
        return real_init(mode=mode, settings=settings, **kwargs)

    wandb.init = unreachable
    train.train(make_config(**{**TINY, "steps": 1}, out_dir=out_dir, wandb="online", timeout=12.0))
    return seen


def test_an_unreachable_wandb_server_delays_no_stage_past_its_timeout(tmp_path):
    """Rank 0 starts tracking before any rank waits on another, bounded well below --timeout:
    rank 1 waits in the rendezvous, not in a step, and the run ends normally (offline)."""
    from tests.spawn import run_workers
    seen = run_workers(_unreachable_worker, 2, str(tmp_path / "out"))
    assert seen[0] == {"group_started": False, "timeout": 3.0} and seen[1] == {}


class SlowRun:
    """A wandb run whose log takes as long as wandb's worst hand-offs, or fails."""

    def __init__(self, fail_at=None):
        self.logged, self.finished, self.fail_at = [], False, fail_at

    def log(self, values, step):
        time.sleep(0.2)
        if step == self.fail_at:
            raise OSError("wandb service gone")
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


def _backend_on(run, tmp_path, monkeypatch):
    monkeypatch.setattr(wandb, "init", lambda **kwargs: run)
    return WandbBackend(make_config(**TINY, out_dir=str(tmp_path), wandb="offline"))


def test_wandb_records_leave_the_step_loop_at_once_and_all_arrive_in_order(tmp_path, monkeypatch):
    run = SlowRun()
    backend = _backend_on(run, tmp_path, monkeypatch)
    started = time.perf_counter()
    for step in range(1, 6):
        backend.log(step, {"loss": float(step)})
    assert time.perf_counter() - started < 0.2  # one run.log takes 0.2 s: none ran in the loop
    backend.close()
    assert run.logged == [(step, {"loss": float(step)}) for step in range(1, 6)] and run.finished


def test_a_failed_wandb_log_is_raised_in_the_step_loop(tmp_path, monkeypatch):
    backend = _backend_on(SlowRun(fail_at=1), tmp_path, monkeypatch)
    backend.log(1, {"loss": 1.0})
    time.sleep(0.5)
    with pytest.raises(OSError, match="wandb service gone"):
        backend.log(2, {"loss": 2.0})
    backend.close()
