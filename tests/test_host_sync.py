"""The per-micro-batch path never waits for the device; spans come from device events on CUDA;
the start-up warm-up leaves training bitwise as it was."""
import time

import pytest
import torch

from minipipe.build import build_run, warm_up_run
from minipipe.config import make_config
from minipipe.layers import build_layers, chunk_inputs
from minipipe.pipeline.optim import lr_at
from minipipe.pipeline.spans import SpanRecorder
from minipipe.pipeline.values import as_tuple
from minipipe.schedule.actions import Kind

TINY = dict(layers=3, d_model=16, heads=2, max_seq_len=8, data="synthetic", batch_size=8,
            dtype="float64", grad_clip=1.0, eval_every=0)
# Every call that makes the host wait for a CUDA tensor's value (or copies it to the host).
HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")
PER_MICROBATCH = {Kind.FORWARD: "_forward", Kind.BACKWARD: "_backward", Kind.SEND_ACT: "send_act",
                  Kind.RECV_ACT: "recv_act", Kind.SEND_GRAD: "_send_grad", Kind.RECV_GRAD: "_recv_grad",
                  Kind.BACKWARD_INPUT: "_backward_input", Kind.BACKWARD_WEIGHT: "_backward_weight"}


def _count_host_reads(monkeypatch, engine) -> list:
    """Calls of HOST_READS (and torch.cuda.synchronize) made while the engine runs one of its
    per-micro-batch actions: (action, what) for each."""
    seen, inside = [], []

    def counting(name, real):
        def call(*args, **kwargs):
            if inside:
                seen.append((inside[-1], name))
            return real(*args, **kwargs)
        return call
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.cuda, "synchronize", counting("synchronize", torch.cuda.synchronize))
    for kind, method in PER_MICROBATCH.items():
        real = getattr(engine, method)

        def action(a, real=real, kind=kind):
            inside.append(kind.value)
            try:
                return real(a)
            finally:
                inside.pop()
        monkeypatch.setattr(engine, method, action)
    return seen


@pytest.mark.parametrize("case", [dict(recompute="always", dropout=0.1),
                                  dict(recompute="never", schedule="interleaved", virtual_stages=2,
                                       microbatches=2),
                                  dict(recompute="always", schedule="zb-h1", dropout=0.1)])
def test_no_host_read_between_the_actions_of_a_step(monkeypatch, case):
    """One process (K = 1; V = 2 hands chunks over in memory): forwards, backwards and the loss
    run without reading a tensor on the host; the step reads the loss and norms once, after."""
    cfg = make_config(**{**TINY, **case})
    run = build_run(cfg)
    seen = _count_host_reads(monkeypatch, run.engine)
    for step in range(2):
        inputs, targets = run.dataset.batch(step, cfg.batch_size)
        run.engine.train_step(inputs, targets, step, lr_at(step, cfg), cfg.grad_clip)
        assert run.engine.executed[-1].kind is Kind.STEP
    assert seen == []


class FakeEvent:
    """torch.cuda.Event on a fake device clock: records when the 'device' reached it."""
    clock = [0.0]

    def __init__(self, enable_timing):
        assert enable_timing

    def record(self):
        self.at = FakeEvent.clock[0]

    def elapsed_time(self, end) -> float:
        return (end.at - self.at) * 1e3  # milliseconds, as CUDA reports them

    def synchronize(self):
        pass


def test_cuda_spans_are_device_time_read_after_the_step(monkeypatch):
    """The device runs behind the host: spans come from the events' device times, put on the
    host clock at the grad-norm all-reduce, and nothing synchronises per action."""
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("synchronize per action"))
    clock = SpanRecorder(torch.device("cuda", 0))
    clock.begin_step(timed=True)  # device time 0.0
    device_times = [(0.010, 0.030), (0.030, 0.075)]  # forward, backward on the device
    for kind, (start, end) in zip(("forward", "backward"), device_times):
        FakeEvent.clock[0] = start
        first = clock.mark()
        FakeEvent.clock[0] = end
        clock.add(kind, 0, None, first, clock.mark())
    FakeEvent.clock[0] = 0.080  # the all-reduce ends on the device; the host sees it now
    anchor = clock.mark()
    clock.synced(anchor)
    host_now = clock.sync_point
    spans = clock.spans()
    for (kind, _, _, start, end), (dev_start, dev_end) in zip(spans, device_times):
        assert start == pytest.approx(host_now - (0.080 - dev_start))
        assert end - start == pytest.approx(dev_end - dev_start)
    clock.begin_step(timed=False)  # an untimed CUDA step records nothing
    assert clock.mark() is None and clock.spans() == []


def test_cpu_spans_are_host_time():
    clock = SpanRecorder(torch.device("cpu"))
    clock.begin_step(timed=False)  # on CPU every step is timed: host time is compute time
    start = clock.mark()
    time.sleep(0.01)
    clock.add("forward", 0, None, start, clock.mark())
    (kind, _, _, begin, end), = clock.spans()
    assert kind == "forward" and end - begin >= 0.01


def test_warm_up_leaves_training_bitwise_unchanged():
    """Dropout (RNG), recompute and an interleaved K = 1 stage: the same losses and weights with
    and without a warm-up before step 0, and no gradient left behind."""
    cfg = make_config(**TINY, dropout=0.1, schedule="interleaved", virtual_stages=2, microbatches=2)
    results = []
    for warm in (False, True):
        run = build_run(cfg)
        if warm:
            assert warm_up_run(run) >= 0.0
            assert all(p.grad is None for p in run.stage.parameters())
        losses = []
        for step in range(2):
            inputs, targets = run.dataset.batch(step, cfg.batch_size)
            losses.append(run.engine.train_step(inputs, targets, step, lr_at(step, cfg), cfg.grad_clip)["loss"])
        results.append((losses, {n: t.clone() for n, t in run.stage.state_dict().items()}))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(results[0][1][n], results[1][1][n]) for n in results[0][1])


def test_warm_up_runs_every_chunk_of_a_batchnorm_stage_without_tracking():
    cfg = make_config(model="amoebanet", preset="tiny", data="synthetic", batch_size=4, microbatches=2,
                      dtype="float32", image_size=8, eval_every=0)
    run = build_run(cfg)
    before = {n: b.clone() for n, b in run.stage.named_buffers()}
    warm_up_run(run)
    assert all(torch.equal(before[n], b) for n, b in run.stage.named_buffers())


@pytest.mark.parametrize("model", ["transformer", "amoebanet"])
def test_warm_up_inputs_have_the_shapes_and_dtypes_of_a_real_bf16_forward(model):
    """chunk_inputs traces without memory; a real forward under CPU bf16 autocast is the truth
    (the Transformer's boundary stays float32, AmoebaNet's cells hand over bfloat16)."""
    case = (dict(layers=3, d_model=16, heads=2, max_seq_len=8, data="synthetic") if model == "transformer"
            else dict(model="amoebanet", preset="tiny", data="synthetic", image_size=8))
    run = build_run(make_config(**case, batch_size=4, microbatches=2, dtype="bfloat16"))
    cfg = run.cfg  # settled: the data's fields filled
    n_layers = len(run.stage.indices)
    chunks = [[0], [1, 2], list(range(3, n_layers))]
    traced = chunk_inputs(cfg, chunks, 2, torch.float32, "cpu", torch.bfloat16)
    value, _ = run.dataset.batch(0, 2)
    value = value.float() if value.is_floating_point() else value
    layers = build_layers(cfg, range(n_layers))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(n_layers):
            if i in (0, 1, 3):
                expected = [(t.shape, t.dtype) for t in as_tuple(value)]
                assert [(t.shape, t.dtype) for t in as_tuple(traced[(0, 1, 3).index(i)])] == expected
            value = layers[i].eval()(value)
