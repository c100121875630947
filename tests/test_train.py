"""One-stage training end to end: the loss falls, accumulation is exact, the CLI works."""
import json
import os
import subprocess
import sys

import torch

import train
from minipipe.config import make_config
from tests.harness import assert_close_tensors, run_steps
from tests.spawn import REPO_ROOT, run_torchrun

TINY = dict(model="transformer", layers=2, d_model=64, heads=4, seq_len=64)


def test_thirty_steps_lower_the_loss_on_the_stdlib_corpus():
    cfg = make_config(**TINY, batch_size=16, steps=30, lr=3e-3, warmup=5, eval_every=0, eval_batches=2)
    history = train.train(cfg)
    first, last = sum(history["losses"][:3]) / 3, sum(history["losses"][-3:]) / 3
    assert first > 5.0 and last < first - 1.0, (first, last)
    assert history["val_losses"][-1][1] < first - 1.0


def test_microbatch_accumulation_equals_the_full_batch_gradient():
    common = dict(**TINY, dtype="float64", batch_size=8, grad_clip=0.0)
    full = run_steps(1, **common, microbatches=1)
    for m in (2, 4, 8):
        accumulated = run_steps(1, **common, microbatches=m)
        assert abs(accumulated["losses"][0] - full["losses"][0]) < 1e-12
        assert_close_tensors(accumulated["grads"], full["grads"], 1e-10, f"M={m}")


def test_amoebanet_trains_on_digits():
    cfg = make_config(model="amoebanet", batch_size=32, steps=12, lr=3e-3, warmup=2, eval_every=0)
    history = train.train(cfg)
    assert history["losses"][-1] < history["losses"][0]


def test_cli_writes_metrics_jsonl_and_sample(tmp_path):
    jsonl = tmp_path / "m.jsonl"
    args = ["--layers", "1", "--d-model", "32", "--heads", "2", "--seq-len", "32", "--steps", "3",
            "--batch-size", "4", "--microbatches", "2", "--sample", "20",
            "--metrics-jsonl", str(jsonl)]
    done = subprocess.run([sys.executable, "train.py", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "sample" in done.stdout
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]  # steps count from 1
    for row in steps:
        for key, kind in (("loss", float), ("lr", float), ("grad_norm", float),
                          ("step_time_s", float), ("tokens_per_s", float)):
            assert isinstance(row[key], kind), key
    torchrun = run_torchrun(["train.py", *args[:-2]], nproc=1, timeout_s=120)
    assert torchrun.returncode == 0, torchrun.stderr


def test_bad_flag_exits_nonzero_with_the_fix():
    done = subprocess.run([sys.executable, "train.py", "--batch-size", "10", "--microbatches", "4"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "multiple of dp x microbatches" in done.stderr


def _losses(path):
    return [json.loads(line)["loss"] for line in path.read_text().splitlines() if '"loss"' in line]


def test_two_stage_torchrun_gives_the_one_process_losses_bitwise(tmp_path):
    """float32 on CPU with one thread per process: the cut changes no arithmetic."""
    args = ["train.py", "--layers", "2", "--d-model", "32", "--heads", "2", "--seq-len", "32",
            "--steps", "4", "--batch-size", "8", "--eval-every", "0", "--dropout", "0.1"]
    one = subprocess.run([sys.executable, *args, "--metrics-jsonl", str(tmp_path / "one.jsonl")],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    two = run_torchrun([*args, "--metrics-jsonl", str(tmp_path / "two.jsonl")], nproc=2, timeout_s=120)
    assert two.returncode == 0, two.stderr
    assert "stage" in two.stdout and "0-1" in two.stdout  # rank 0 printed the partition plan
    one_losses = _losses(tmp_path / "one.jsonl")
    assert len(one_losses) == 4 and _losses(tmp_path / "two.jsonl") == one_losses


def test_float16_loss_scaling_skips_overflowing_steps_and_recovers():
    from minipipe.build import build_run
    from minipipe.pipeline.optim import lr_at
    cfg = make_config(**TINY, dtype="float16", batch_size=4, microbatches=2)
    run = build_run(cfg)
    assert run.engine.scale.scale == 2.0 ** 16
    before = {n: p.detach().clone() for n, p in run.stage.named_parameters()}
    run.engine.scale.scale = 1e38  # the scaled gradients overflow
    result = run.engine.train_step(*run.dataset.batch(0, 4), 0, lr_at(0, cfg), cfg.grad_clip)
    assert result["skipped"] and run.engine.scale.scale == 5e37
    assert all(torch.equal(p, before[n]) for n, p in run.stage.named_parameters())
    run.engine.scale.scale = 2.0 ** 10
    result = run.engine.train_step(*run.dataset.batch(1, 4), 1, lr_at(1, cfg), cfg.grad_clip)
    assert not result["skipped"] and 0 < result["grad_norm"] < 100
    assert any(not torch.equal(p, before[n]) for n, p in run.stage.named_parameters())


def test_a_diverged_float32_step_raises_instead_of_skipping():
    import pytest

    from minipipe.build import build_run
    cfg = make_config(**TINY, batch_size=4, microbatches=2)
    run = build_run(cfg)
    with torch.no_grad():
        next(run.stage.parameters()).fill_(float("nan"))
    from minipipe.errors import MinipipeError
    from minipipe.pipeline.optim import DivergedError
    with pytest.raises(DivergedError, match="step 0: the gradient norm is nan.*Lower --lr") as raised:
        run.engine.train_step(*run.dataset.batch(0, 4), 0, 1e-3, cfg.grad_clip)
    assert isinstance(raised.value, MinipipeError)  # train.py prints it as `minipipe error: ...`, exit 2
