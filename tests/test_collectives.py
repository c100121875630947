"""Every wait on other ranks names what it waited for: each collective minipipe makes goes through
minipipe.pipeline.collectives, and a collective that fails (a peer died: gloo's "Connection closed
by peer") becomes the caller's MinipipeError naming this rank, its stage and what it waited for,
in every place that waits (engine, evaluation, timeline, the profiled cut, checkpoints,
--init-from)."""
import ast
import dataclasses
from pathlib import Path

import pytest
import torch.distributed as dist

from minipipe import build
from minipipe.build import build_run
from minipipe.checkpoint.checkpointer import Checkpointer, load_checkpoint, save_checkpoint
from minipipe.checkpoint.directory import agreed_resume_path, claim_checkpoint_dir
from minipipe.checkpoint.hf_gpt2 import HFModelError, load_into_stage
from minipipe.config import make_config
from minipipe.data import DataCursor
from minipipe.errors import CheckpointError, PipelineError
from minipipe.layers import count_layer_params
from minipipe.pipeline.collectives import raise_first
from minipipe.tracking import timeline

ROOT = Path(__file__).resolve().parent.parent
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list",
               "barrier", "gather", "gather_object", "reduce", "reduce_scatter", "scatter_object_list",
               "all_to_all", "monitored_barrier"}
TINY = dict(model="transformer", layers=2, d_model=16, heads=2, max_seq_len=8, data="synthetic",
            batch_size=4, microbatches=2, timeout=7.0)
LOST = "failed: lost the connection (the peer process exited or crashed)"


def _callee(call: ast.Call) -> str:
    """The name a call goes to; for functools.partial(f, ...), f's name."""
    func = call.func
    if isinstance(func, ast.Name) and func.id == "partial" and call.args:
        func = call.args[0]
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def test_every_collective_in_the_package_goes_through_the_wrapper():
    """A torch.distributed collective is named only inside a call of `collective` (or the
    engine's `_collective`, which is one with the step filled in)."""
    checked = 0
    for path in sorted((ROOT / "minipipe").rglob("*.py")):
        if path.name == "collectives.py":
            continue
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr in COLLECTIVES
                    and isinstance(node.value, ast.Name) and node.value.id == "dist"):
                continue
            checked += 1
            up = parents.get(node)
            while up is not None and not (isinstance(up, ast.Call) and _callee(up).endswith("collective")):
                up = parents.get(up)
            assert up is not None, f"{path.relative_to(ROOT)}:{node.lineno}: dist.{node.attr} outside collective()"
    assert checked >= 8


def _break_collectives(monkeypatch):
    """Every collective fails the way gloo does when a peer process has exited."""
    def lost(*args, **kwargs):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    for name in COLLECTIVES:
        if hasattr(dist, name):
            monkeypatch.setattr(dist, name, lost)


@pytest.fixture
def peers_gone(monkeypatch):
    _break_collectives(monkeypatch)


def _two_ranks(layout, dp: int = 1):
    """This rank's layout as if a second rank (that died) were in the run (a replica with dp=2)."""
    return dataclasses.replace(layout, world_size=2, dp=dp)


def _expect(error, what, run):
    with pytest.raises(error) as caught:
        run()
    assert f"waiting for {what} {LOST}" in str(caught.value), str(caught.value)
    assert str(caught.value).startswith("rank 0 (stage 0)")
    return str(caught.value)


def test_the_engine_evaluation_and_timeline_name_their_collective(peers_gone):
    run = build_run(make_config(**TINY))
    batch = run.dataset.batch(0, 4)
    run.engine.layout = _two_ranks(run.layout, dp=2)
    message = _expect(PipelineError, "the data-parallel gradient all-reduce",
                      lambda: run.engine.train_step(*batch, 0, 1e-3, 1.0))
    assert message.startswith("rank 0 (stage 0), step 0:") and "raise --timeout" in message
    run.engine.layout = _two_ranks(run.layout)
    _expect(PipelineError, "the gradient-norm all-reduce", lambda: run.engine.train_step(*batch, 3, 1e-3, 1.0))
    _expect(PipelineError, "the evaluation loss all-reduce", lambda: run.engine.evaluate([batch]))
    fake = _two_ranks(run.layout)
    _expect(PipelineError, "every stage's bubble and peak memory",
            lambda: timeline.pipeline_stats(run.engine, fake, spec=run.spec))
    _expect(PipelineError, "every rank's spans of the traced step", lambda: timeline.gather_timeline(run.engine, fake))


def test_the_profiled_cut_names_its_broadcast(peers_gone):
    run = build_run(make_config(**TINY))
    cfg = dataclasses.replace(run.cfg, balance_by="time")
    n_layers = len(count_layer_params(cfg))
    _expect(PipelineError, "rank 0's cut by measured time", lambda: build._choose_balance(
        cfg, run.spec, _two_ranks(run.layout), run.dataset, "torch", n_layers))


def test_checkpoints_name_every_wait(tmp_path, monkeypatch):
    cfg = make_config(**TINY, ckpt_dir=str(tmp_path))
    run = build_run(cfg)
    cursor = DataCursor(run.dataset, cfg.batch_size)
    path = save_checkpoint(run, cursor, 0, 1e-3)
    _break_collectives(monkeypatch)
    fake = _two_ranks(run.layout)
    run.layout = fake
    message = _expect(CheckpointError, "every rank to start checkpoint step-000002",
                      lambda: save_checkpoint(run, cursor, 1, 1e-3))
    assert "the previous checkpoint is intact" in message
    _expect(CheckpointError, f"every rank to verify {path}", lambda: load_checkpoint(run, cursor, path))
    _expect(CheckpointError, "every rank to agree on the checkpoint to resume", lambda: agreed_resume_path(cfg, fake))
    _expect(CheckpointError, "every rank to claim --ckpt-dir", lambda: claim_checkpoint_dir(cfg, fake, path))
    stopping = Checkpointer(run, cursor)
    try:
        _expect(PipelineError, "every rank to agree whether to stop after this step", stopping._any_rank_stopping)
    finally:
        stopping.close()


def test_init_from_names_its_verdict_exchange(tmp_path, peers_gone):
    run = build_run(make_config(**TINY))
    run.layout = _two_ranks(run.layout)
    run.cfg = dataclasses.replace(run.cfg, init_from=str(tmp_path))
    _expect(HFModelError, f"every rank to check --init-from {tmp_path}", lambda: load_into_stage(run))


def test_raise_first_raises_the_first_problem_in_rank_order_on_every_rank(monkeypatch):
    verdicts = [None, "rank 1 (stage 1): shard missing", "rank 2 (stage 2): bad digest"]

    def all_gather_object(out, value):
        out[:] = verdicts
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    layout = type("Layout", (), dict(rank=0, stage=0, world_size=3))
    with pytest.raises(CheckpointError, match=r"^rank 1 \(stage 1\): shard missing$"):
        raise_first(layout, None, "every rank to verify", CheckpointError)
    verdicts[1] = None
    with pytest.raises(CheckpointError, match=r"^rank 2 \(stage 2\): bad digest$"):
        raise_first(layout, None, "every rank to verify", CheckpointError)
    verdicts[2] = None
    raise_first(layout, None, "every rank to verify", CheckpointError)
