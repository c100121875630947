"""What only a GPU can show about the engine (bench/gpu_check.sh runs these; they skip on CPU):
no synchronising call between a step's actions under torch's own sync detector, and spans from
CUDA events that cost a logged step nothing."""
import statistics
import time

import pytest
import torch

from minipipe.build import build_run
from minipipe.config import make_config
from minipipe.pipeline.optim import lr_at
from minipipe.schedule.actions import Kind

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CASE = dict(layers=4, d_model=128, heads=4, max_seq_len=128, data="synthetic", batch_size=16,
            microbatches=4, dtype="bfloat16", device="cuda", eval_every=0, dropout=0.1)
# the step's set-up (batch to the device through pinned memory) and every per-micro-batch action
PER_MICROBATCH = ("begin", "_forward", "_backward", "recv_act", "send_act", "_recv_grad", "_send_grad")


def _step(run, step):
    inputs, targets = run.dataset.batch(step, run.cfg.batch_size)
    return run.engine.train_step(inputs, targets, step, lr_at(step, run.cfg), run.cfg.grad_clip)


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_per_microbatch_actions_never_synchronise(monkeypatch, kernels):
    """torch.cuda.set_sync_debug_mode('error') raises on any synchronising CUDA call; it is on
    during every per-micro-batch action of two steps (warm-up and autotuning done before)."""
    run = build_run(make_config(**CASE, kernels=kernels))
    _step(run, 0)  # compiles and autotunes outside the checked steps
    for name in PER_MICROBATCH:
        real = getattr(run.engine, name)

        def checked(*args, real=real):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return real(*args)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        monkeypatch.setattr(run.engine, name, checked)
    for step in (1, 2):
        assert _step(run, step)["loss"] > 0


def test_event_spans_are_device_time_on_timed_steps_only():
    run = build_run(make_config(**CASE, kernels="torch"))
    for step in range(3):
        _step(run, step)
    seconds = {False: [], True: []}
    for step in range(3, 23):
        timed = step % 2 == 0
        run.engine.timed = timed
        torch.cuda.synchronize()
        start = time.perf_counter()
        _step(run, step)
        torch.cuda.synchronize()
        seconds[timed].append(time.perf_counter() - start)
        if timed:
            spans = run.engine.spans
            kinds = {kind for kind, *_ in spans}
            assert {"forward", "backward", "norm_allreduce"} <= kinds
            assert all(end >= start for _, _, _, start, end in spans)
            compute = sum(end - start for kind, _, _, start, end in spans if kind in ("forward", "backward"))
            assert 0 < compute <= spans[-1][4] - spans[0][3] + 1e-6
        else:
            assert run.engine.spans == []
    ratio = statistics.median(seconds[True]) / statistics.median(seconds[False])
    print(f"timed / untimed step time (median of 10 each): {ratio:.3f}")  # gpu_check.sh records it
    assert run.engine.executed[-1].kind is Kind.STEP
