"""Re-materialisation keeps the schedule's in-flight stage inputs + one micro-batch's
intermediates: M inputs under gpipe, at most K - stage under 1f1b."""
import weakref

import pytest
import torch

from minipipe.build import build_run
from minipipe.config import make_config
from minipipe.pipeline.optim import lr_at
from minipipe.schedule.check import check
from tests.spawn import run_workers

CASE = dict(model="transformer", layers=16, d_model=32, heads=2, max_seq_len=32, data="synthetic",
            batch_size=16, microbatches=8)


class SavedBytes:
    """Live bytes autograd holds for backward (parameters excluded, shared storage counted once)."""

    def __init__(self, params):
        self.param_storages = {p.untyped_storage().data_ptr() for p in params}
        self.refs, self.sizes, self.live, self.peak = {}, {}, 0, 0

    def pack(self, tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in self.param_storages:
            if self.refs.get(ptr, 0) == 0:
                self.sizes[ptr] = tensor.untyped_storage().nbytes()
                self.live += self.sizes[ptr]
            self.refs[ptr] = self.refs.get(ptr, 0) + 1
            holder = _Holder(tensor.detach())  # a saved output kept with its grad_fn would keep a
            weakref.finalize(holder, self._release, ptr)  # retained graph alive (split backward)
            return holder
        return _Holder(tensor.detach())

    def _release(self, ptr):
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            self.live -= self.sizes[ptr]

    def pack_and_sample(self, extra_bytes):
        """A pack hook that also records the peak of live bytes + extra_bytes()."""
        def pack(tensor):
            holder = self.pack(tensor)
            self.sample(extra_bytes())
            return holder
        return pack

    def sample(self, extra: int = 0):
        self.peak = max(self.peak, self.live + extra)


def _unpack(holder):
    return holder.tensor


class _Holder:
    def __init__(self, tensor):
        self.tensor = tensor


def _nbytes(value) -> int:
    tensors = [value] if isinstance(value, torch.Tensor) else list(value)
    return sum(t.untyped_storage().nbytes() for t in tensors)


def _kept_bytes(recompute: str, schedule: str = "gpipe", virtual_stages: int = 1) -> dict:
    cfg = make_config(**CASE, recompute=recompute, schedule=schedule, virtual_stages=virtual_stages)
    run = build_run(cfg)
    engine = run.engine
    tracker = SavedBytes(list(run.stage.parameters()))

    def stash_bytes():
        return sum(_nbytes(v) for v in engine.state.stashed_inputs.values())

    real_forward = engine._forward
    stashed = []  # stage inputs held after each forward

    def forward_and_sample(action):
        real_forward(action)
        tracker.sample(stash_bytes())
        stashed.append(len(engine.state.stashed_inputs))

    engine._forward = forward_and_sample
    inputs, targets = run.dataset.batch(0, cfg.batch_size)

    with torch.autograd.graph.saved_tensors_hooks(tracker.pack_and_sample(stash_bytes), _unpack):
        engine.train_step(inputs, targets, 0, lr_at(0, cfg), cfg.grad_clip)
    # The estimate: M stage inputs + one micro-batch's intermediates (measured on micro-batch 0).
    micro = inputs[: cfg.batch_size // cfg.microbatches]
    stage_input = micro if run.layout.is_first else torch.zeros(len(micro), cfg.seq_len, cfg.d_model,
                                                         requires_grad=True)
    one = SavedBytes(list(run.stage.parameters()))
    with torch.autograd.graph.saved_tensors_hooks(one.pack_and_sample(lambda: 0), _unpack):
        run.stage(stage_input, 0, 0)
    estimate = cfg.microbatches * _nbytes(stage_input) + one.peak
    return {"peak": tracker.peak, "estimate": estimate, "peak_stashed": max(stashed)}


def _memory_worker(rank, world_size):
    kept = {mode: _kept_bytes(mode) for mode in ("always", "never")}
    kept.update({schedule: _kept_bytes("always", schedule, v)
                 for schedule, v in (("1f1b", 1), ("interleaved", 2), ("zb-h1", 1), ("zbv", 2), ("dualpipev", 2))})
    return kept


@pytest.fixture(scope="module")
def kept_by_rank():
    """K=2, M=8, one set of processes for every measurement below."""
    return run_workers(_memory_worker, 2, timeout_s=180)


def test_recompute_keeps_inputs_plus_one_microbatch_and_3x_less_than_never(kept_by_rank):
    for rank, kept in enumerate(kept_by_rank):
        always, never = kept["always"], kept["never"]
        assert always["peak"] <= 1.2 * always["estimate"], (rank, always)
        assert always["peak"] >= 0.5 * always["estimate"], (rank, always)  # the hooks saw the step
        assert never["peak"] >= 3 * always["peak"], (rank, never["peak"], always["peak"])


def test_1f1b_stashes_at_most_k_minus_stage_inputs_where_gpipe_stashes_m(kept_by_rank):
    """Counted like the bytes above: stashed stage inputs after each forward, with recompute."""
    stage0, stage1 = kept_by_rank
    assert stage0["always"]["peak_stashed"] == 8 and stage1["always"]["peak_stashed"] == 8  # gpipe: M
    assert stage0["1f1b"]["peak_stashed"] == 2 and stage1["1f1b"]["peak_stashed"] == 1  # K - stage
    assert stage1["1f1b"]["peak"] < stage1["always"]["peak"]  # and the bytes follow (stage 0 stashes ids)
    # interleaved (V=2, so 16 chunk inputs in a step): Megatron's warm-up (K-1-r)*2 + (V-1)*K, + 1
    assert stage0["interleaved"]["peak_stashed"] == 5 and stage1["interleaved"]["peak_stashed"] == 3


def test_v_schedules_stash_what_the_checker_simulates(kept_by_rank):
    """zbv and dualpipev at K=2, M=8 (16 chunk inputs a step): the stage inputs the engine holds
    stashed peak where the schedule's simulation says (its chunk units: zbv's 2K = 4 is 1F1B's K
    stage inputs of twice the chunks; dualpipev's 2K+1 = 5)."""
    for schedule, peaks in (("zbv", [4, 4]), ("dualpipev", [5, 5])):
        assert check(schedule, 2, 8, 2).peak_stashed == peaks
        assert [kept[schedule]["peak_stashed"] for kept in kept_by_rank] == peaks, schedule


def test_zb_h1_stashes_what_1f1b_stashes(kept_by_rank):
    """The split backward recomputes at I: zb-h1's stage inputs wait stashed exactly as 1f1b's
    (K - stage at K=2, M=8); what W keeps after I is the planner's to count (tests/test_plan.py)."""
    stage0, stage1 = kept_by_rank
    assert stage0["zb-h1"]["peak_stashed"] == stage0["1f1b"]["peak_stashed"] == 2
    assert stage1["zb-h1"]["peak_stashed"] == stage1["1f1b"]["peak_stashed"] == 1
