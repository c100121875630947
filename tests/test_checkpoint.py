"""Sharded safetensors checkpoints: every tensor round-trips, resume is bitwise exact, any stage
count and dp loads any checkpoint and continues with the uninterrupted losses, the export computes
what the pipeline computed, and broken checkpoints are refused before training, untouched."""
import hashlib
import json
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

import train
from minipipe.build import build_run
from minipipe.checkpoint import checkpointer as checkpoint
from minipipe.checkpoint import files as checkpoint_files
from minipipe.checkpoint.checkpointer import load_checkpoint, optimizer_tensors, save_checkpoint
from minipipe.config import make_config
from minipipe.data import DataCursor, load_dataset
from minipipe.errors import CheckpointError
from minipipe.export import load_exported
from minipipe.export import main as export_main
from minipipe.models import registry
from minipipe.tracking.metrics import MetricsLogger
from tests.spawn import run_workers

# Six steps, checkpointed after steps 3 and 6; dropout on, so resumed masks are checked too.
TINY = dict(model="transformer", layers=4, d_model=16, heads=2, max_seq_len=8, data="synthetic",
            batch_size=8, microbatches=2, steps=6, ckpt_every=3, keep=0, eval_every=0, dropout=0.1)
AMOEBA = dict(model="amoebanet", cells=1, filters=4, image_size=8, channels=3, data="synthetic",
              batch_size=8, microbatches=2)


def _train(**values) -> dict:
    return train.train(make_config(**values), logger=MetricsLogger([]))


def _train_worker(rank, world_size, values):
    return _train(**values)


def _run(world: int, **values) -> dict:
    """History of a training run on `world` processes (this process when world is 1)."""
    return _train(**values) if world == 1 else run_workers(_train_worker, world, values)[0]


def _shards(ckpt, kind: str) -> dict:
    merged = {}
    for shard in sorted(ckpt.glob(f"{kind}-*.safetensors")):
        merged.update(load_file(shard))
    return merged


def _assert_equal_tensors(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def _file_hashes(directory) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(autouse=True)
def restore_sigterm_handler():
    """A run that raises never reaches Checkpointer.close(); keep this process's handler."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Uninterrupted runs in 1 and 2 stages: {K: (checkpoint dir, history)}."""
    runs = {}
    for n_stages in (1, 2):
        ckpt = tmp_path_factory.mktemp(f"straight-k{n_stages}")
        runs[n_stages] = ckpt, _run(n_stages, **TINY, ckpt_dir=str(ckpt))
    return runs


def test_every_parameter_buffer_and_optimizer_state_round_trips(tmp_path):
    cfg = make_config(**AMOEBA, ckpt_dir=str(tmp_path))
    trained = build_run(cfg)
    cursor = DataCursor(trained.dataset, cfg.batch_size)
    for step in range(2):
        inputs, targets = cursor.next_batch()
        trained.engine.train_step(inputs, targets, step, 1e-3, 1.0)
    path = save_checkpoint(trained, cursor, 1, 1e-3)
    rng_at_save = torch.get_rng_state()
    torch.rand(3)
    fresh = build_run(make_config(**AMOEBA))
    fresh_cursor = DataCursor(fresh.dataset, cfg.batch_size)
    assert load_checkpoint(fresh, fresh_cursor, path) == 1
    assert fresh_cursor.position == 2 and torch.equal(torch.get_rng_state(), rng_at_save)
    saved = trained.stage.state_dict()
    assert any(name.endswith("running_mean") and t.abs().sum() > 0 for name, t in saved.items())
    _assert_equal_tensors(fresh.stage.state_dict(), saved)
    moments = optimizer_tensors(trained.stage, trained.optimizer)
    assert {name.rsplit(".", 1)[1] for name in moments} == {"step", "exp_avg", "exp_avg_sq"}
    _assert_equal_tensors(optimizer_tensors(fresh.stage, fresh.optimizer), moments)


def test_shards_load_with_plain_safetensors_and_match_the_index(straight):
    ckpt = straight[2][0] / "step-000003"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["world"] == {"stages": 2, "dp": 1}
    assert state["data_cursor"]["position"] == 3
    for kind in ("model", "optimizer"):
        index = json.loads((ckpt / f"{kind}.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert files == [f"{kind}-00001-of-00002.safetensors", f"{kind}-00002-of-00002.safetensors"]
        shards = {f: load_file(ckpt / f) for f in files}
        held = {name: f for f, tensors in shards.items() for name in tensors}
        assert held == index["weight_map"]  # every name once, in the file the index says
        total = sum(t.numel() * t.element_size() for tensors in shards.values() for t in tensors.values())
        assert index["metadata"]["total_size"] == total
    assert {n for n in _shards(ckpt, "model") if "layers.1." in n} >= {"layers.1.qkv.weight"}
    for name, record in state["files"].items():
        assert hashlib.sha256((ckpt / name).read_bytes()).hexdigest() == record["sha256"]


def test_resume_in_the_same_layout_gives_bitwise_the_straight_losses_and_weights(straight, tmp_path):
    ckpt, history = straight[1]
    resumed = _train(**TINY, ckpt_dir=str(tmp_path), resume=str(ckpt / "step-000003"))
    assert resumed["losses"] == history["losses"][3:]
    for kind in ("model", "optimizer"):
        _assert_equal_tensors(_shards(tmp_path / "step-000006", kind), _shards(ckpt / "step-000006", kind))


@pytest.mark.parametrize("saved_k,loaded_k", [(2, 1), (1, 2), (2, 4)])
def test_resharding_continues_with_the_uninterrupted_losses(straight, tmp_path, saved_k, loaded_k):
    ckpt, history = straight[saved_k]
    assert history["losses"] == straight[1][1]["losses"]  # float32: the cut changes no arithmetic
    resumed = _run(loaded_k, **TINY, ckpt_dir=str(tmp_path), resume=str(ckpt / "step-000003"))
    assert resumed["losses"] == history["losses"][3:]
    for kind in ("model", "optimizer"):
        _assert_equal_tensors(_shards(tmp_path / "step-000006", kind), _shards(ckpt / "step-000006", kind))


@pytest.mark.parametrize("loaded_k,schedule,v", [(1, "interleaved", 2), (2, "1f1b", 1), (2, "zb-h1", 1),
                                                 (2, "zbv", 2), (1, "dualpipev", 2)])
def test_a_checkpoint_resumes_under_another_schedule_exactly(straight, tmp_path, loaded_k, schedule, v):
    """Saved under gpipe (V=1), resumed under 1f1b, zb-h1 (split backwards), interleaved chunks
    or the V (zbv: stage 0 holds layers 0 and 3, stage 1 layers 1-2): with M=2 every schedule
    adds the same two micro-batch gradients (a + b == b + a), so the losses and every tensor
    after the resume are bitwise those of the uninterrupted gpipe run."""
    ckpt, history = straight[1]
    resumed = _run(loaded_k, **TINY, ckpt_dir=str(tmp_path), resume=str(ckpt / "step-000003"),
                   schedule=schedule, virtual_stages=v)
    assert resumed["losses"] == history["losses"][3:]
    for kind in ("model", "optimizer"):
        _assert_equal_tensors(_shards(tmp_path / "step-000006", kind), _shards(ckpt / "step-000006", kind))
    state = json.loads((tmp_path / "step-000006" / "trainer_state.json").read_text())
    assert state["config"]["schedule"] == schedule and len(state["balance"]) == loaded_k * v


@pytest.mark.parametrize("loaded_k,schedule,v", [(2, "zb-h1", 1), (1, "gpipe", 1)])
def test_a_checkpoint_written_under_zbv_resumes_under_another_schedule_exactly(straight, tmp_path, loaded_k,
                                                                                schedule, v):
    """The V placement's shards (each stage's layers, keyed by global index) re-shard like any
    other: saved under zbv on 2 stages, resumed under zb-h1 or one process, bitwise the gpipe run."""
    saved = tmp_path / "zbv"
    history = _run(2, **TINY, ckpt_dir=str(saved), schedule="zbv", virtual_stages=2)
    assert history["losses"] == straight[1][1]["losses"]
    resumed = _run(loaded_k, **TINY, ckpt_dir=str(tmp_path / "resumed"), resume=str(saved / "step-000003"),
                   schedule=schedule, virtual_stages=v)
    assert resumed["losses"] == history["losses"][3:]
    for kind in ("model", "optimizer"):
        _assert_equal_tensors(_shards(tmp_path / "resumed" / "step-000006", kind), _shards(saved / "step-000006", kind))


def test_a_data_parallel_checkpoint_continues_in_one_replica(tmp_path):
    common = dict(TINY, dtype="float64", dropout=0.0)  # masks are per replica's micro-batch index
    history = _run(2, **common, dp=2, stages=1, ckpt_dir=str(tmp_path / "dp2"))
    resumed = _train(**common, ckpt_dir=str(tmp_path / "dp1"), resume=str(tmp_path / "dp2" / "step-000003"))
    assert len(list((tmp_path / "dp2" / "step-000003").glob("model-*"))) == 1  # replicas share a shard
    for got, want in zip(resumed["losses"], history["losses"][3:], strict=True):
        assert abs(got - want) <= 1e-10 * abs(want)


def test_exported_model_computes_the_pipelines_validation_loss(straight, tmp_path):
    ckpt, history = straight[2]
    assert export_main([str(ckpt), str(tmp_path)]) == 0  # the latest: step-000006, where validation ran
    assert export_main([str(tmp_path / "absent"), str(tmp_path / "elsewhere")]) == 2
    cfg, model = load_exported(tmp_path)
    _assert_equal_tensors({f"layers.{n}": t for n, t in model.state_dict().items()},
                          _shards(ckpt / "step-000006", "model"))
    data = load_dataset(cfg)
    loss_sum, units = 0.0, 0
    with torch.no_grad():
        for i in range(cfg.eval_batches):
            inputs, targets = data.batch(i, cfg.batch_size, split="val")
            loss_sum += float(registry.loss_fn(cfg)(model(inputs), targets))
            units += registry.count_loss_units(cfg, targets)
    pipeline_val = history["val_losses"][-1][1]
    assert abs(loss_sum / units - pipeline_val) <= 1e-6 * pipeline_val


def test_a_save_that_fails_between_shards_says_the_previous_checkpoint_survives(straight, tmp_path, monkeypatch):
    real_write, calls = checkpoint._write_shard, []

    def write_then_fail(directory, file_name, tensors):
        calls.append(file_name)
        if len(calls) == 4:  # the second save: its model shard is written, its optimizer shard not
            raise OSError("disk full")
        return real_write(directory, file_name, tensors)

    monkeypatch.setattr(checkpoint, "_write_shard", write_then_fail)
    with pytest.raises(CheckpointError, match="disk full.*step-000003 is intact"):
        _train(**TINY, ckpt_dir=str(tmp_path))
    assert (tmp_path / "latest").read_text().strip() == "step-000003"
    assert (tmp_path / ".tmp-step-000006").is_dir() and not (tmp_path / "step-000006").exists()
    monkeypatch.undo()
    resumed = _train(**TINY, ckpt_dir=str(tmp_path))  # --resume auto
    assert resumed["losses"] == straight[1][1]["losses"][3:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000003", "step-000006"]


def test_keep_prunes_to_the_newest_complete_checkpoints(tmp_path):
    _train(**dict(TINY, steps=4, ckpt_every=1, keep=2), ckpt_dir=str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000003", "step-000004"]
    assert (tmp_path / "latest").read_text().strip() == "step-000004"


def _corrupt(ckpt, case: str) -> dict:
    """Damage a copy of a 2-stage checkpoint; returns the flags the loading run uses."""
    def rewrite_index(edit):
        index_file = ckpt / "model.safetensors.index.json"
        index = json.loads(index_file.read_text())
        edit(index["weight_map"])
        index_file.write_text(json.dumps(index))
        state_file = ckpt / "trainer_state.json"  # a consistent-looking but wrong checkpoint
        state = json.loads(state_file.read_text())
        state["files"][index_file.name] = checkpoint_files.digest(index_file)
        state_file.write_text(json.dumps(state))

    shard = ckpt / "model-00001-of-00002.safetensors"
    if case == "missing shard":
        (ckpt / "model-00002-of-00002.safetensors").unlink()
    elif case == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:1000])
    elif case == "sha mismatch":
        data = bytearray(shard.read_bytes())
        data[-10] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif case == "index maps a tensor to a file without it":
        rewrite_index(lambda weight_map: weight_map.update(
            {"layers.0.tokens.weight": "model-00002-of-00002.safetensors"}))
    elif case == "index lacks a tensor":
        rewrite_index(lambda weight_map: weight_map.pop("layers.5.proj.weight"))
    elif case == "other tensor shapes":
        state = json.loads((ckpt / "trainer_state.json").read_text())
        state["config"]["max_seq_len"] = 16
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
        return dict(max_seq_len=16)
    return {"other model shape": dict(d_model=32), "other vocab": dict(vocab=300)}.get(case, {})


@pytest.mark.parametrize("case,message", [
    ("missing shard", r"model-00002-of-00002\.safetensors is missing"),
    ("truncated shard", r"model-00001-of-00002\.safetensors is 1000 bytes but was saved with"),
    ("sha mismatch", r"model-00001-of-00002\.safetensors: sha256 mismatch"),
    ("other model shape", r"another model: d_model=16 \(this run: 32\)"),
    ("other vocab", r"another model: vocab=256 \(this run: 300\)"),
    ("other tensor shapes", r"model-00001-of-00002\.safetensors: layers\.0\.positions\.weight has "
                            r"shape \[8, 16\], this model needs \[16, 16\]"),
    ("index maps a tensor to a file without it",
     r"maps layers\.0\.tokens\.weight to model-00002-of-00002\.safetensors, which does not hold it"),
    ("index lacks a tensor", r"model\.safetensors\.index\.json has no tensor layers\.5\.proj\.weight"),
])
def test_a_broken_checkpoint_is_refused_before_training_and_left_untouched(straight, tmp_path, case, message):
    ckpt = tmp_path / "step-000003"
    shutil.copytree(straight[2][0] / "step-000003", ckpt)
    overrides = _corrupt(ckpt, case)
    before = _file_hashes(ckpt)
    with pytest.raises(CheckpointError, match=message):
        _train(**{**TINY, **overrides}, ckpt_dir=str(tmp_path / "new"), resume=str(ckpt))
    assert _file_hashes(ckpt) == before
    assert not (tmp_path / "new").exists()  # no step ran, nothing was saved


def test_every_rank_refuses_a_shard_only_one_stage_reads(straight, tmp_path):
    ckpt = tmp_path / "step-000003"
    shutil.copytree(straight[2][0] / "step-000003", ckpt)
    _corrupt(ckpt, "missing shard")
    outcomes = run_workers(_train_worker, 2, dict(TINY, resume=str(ckpt)), expect_failure=True)
    for outcome in outcomes:
        assert outcome.error == "CheckpointError", outcome
        assert "rank 1 (stage 1)" in outcome.message and "is missing" in outcome.message


def test_float16_loss_scale_survives_a_resume(tmp_path):
    cfg = make_config(**TINY, dtype="float16", ckpt_dir=str(tmp_path))
    run = build_run(cfg)
    run.engine.scale.scale, run.engine.scale.steps_at_scale = 1024.0, 7
    path = save_checkpoint(run, DataCursor(run.dataset, cfg.batch_size), 3, 1e-3)
    resumed = build_run(cfg)
    assert resumed.engine.scale.scale == 2.0 ** 16
    load_checkpoint(resumed, DataCursor(resumed.dataset, cfg.batch_size), path)
    assert (resumed.engine.scale.scale, resumed.engine.scale.steps_at_scale) == (1024.0, 7)


def _failing_save_worker(rank, world_size, ckpt_dir):
    run = build_run(make_config(**TINY, ckpt_dir=ckpt_dir, timeout=5.0))
    if rank == 1:
        def disk_full(*args):
            raise OSError(28, "No space left on device")
        checkpoint._write_shard = disk_full
    save_checkpoint(run, DataCursor(run.dataset, 8), 0, 1e-3)


def test_a_rank_failing_mid_save_makes_the_others_say_what_they_waited_for(tmp_path):
    outcomes = run_workers(_failing_save_worker, 2, str(tmp_path), expect_failure=True, timeout_s=60)
    assert outcomes[1].error == "CheckpointError"  # the disk-full rank says what survives
    assert "No space left on device" in outcomes[1].message
    assert "no earlier checkpoint of this run exists" in outcomes[1].message
    assert outcomes[0].error == "CheckpointError", outcomes[0]
    assert "rank 0 (stage 0): waiting for every rank to write its shards of step-000001" in outcomes[0].message
    assert not (tmp_path / "latest").exists()


def _other_view_worker(rank, world_size, shared, node_view):
    """train.main on every rank; rank 1's node shows `node_view` where the others see `shared`
    (a --ckpt-dir on node-local disks): what it reads of a checkpoint comes from there."""
    import contextlib
    import io
    from pathlib import Path

    from minipipe.checkpoint import directory as checkpoint_dir
    if rank == 1:
        real_read = checkpoint_dir.read_trainer_state
        checkpoint_dir.read_trainer_state = lambda path: real_read(Path(str(path).replace(shared, node_view)))
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in TINY.items()]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = train.main([*flags, f"--ckpt-dir={shared}", "--resume=auto", "--timeout=30"])
    return code, stderr.getvalue()


def test_ranks_that_see_another_checkpoint_are_refused_on_every_rank_before_training(straight, tmp_path):
    shared, node_view = tmp_path / "shared", tmp_path / "node1"
    shutil.copytree(straight[2][0], shared)
    node_view.mkdir()  # rank 1's disk holds an older copy of the run: step-000003 only
    shutil.copytree(straight[2][0] / "step-000003", node_view / "step-000003")
    before = {p.name: _file_hashes(p) for p in shared.iterdir() if p.is_dir()}
    for code, stderr in run_workers(_other_view_worker, 2, str(shared), str(node_view), timeout_s=90):
        assert code == 2, stderr
        assert (f"rank 0 resumes {shared / 'step-000006'} at step 5, but rank 1 cannot read it "
                f"({node_view / 'step-000006' / 'trainer_state.json'} is missing") in stderr, stderr
        assert "on a filesystem every node shares" in stderr
    assert {p.name: _file_hashes(p) for p in shared.iterdir() if p.is_dir()} == before
    assert sorted(p.name for p in shared.iterdir()) == ["latest", "step-000003", "step-000006"]


def test_a_disagreement_names_every_rank_that_differs_and_what_it_saw():
    from minipipe.checkpoint.directory import disagreement
    assert disagreement("ck/step-000006", 5, [5, 5, 5]) is None
    message = disagreement("ck/step-000006", 5, [5, 2, 5, "cannot read it (gone)"])
    assert message.startswith("the ranks disagree on the checkpoint to resume: rank 0 resumes "
                              "ck/step-000006 at step 5, but rank 1 sees step 2; rank 3 cannot read it (gone);")
    assert "rank 2" not in message and "filesystem every node shares" in message


def test_a_shard_rank_0_cannot_see_is_never_published(tmp_path, monkeypatch):
    """What a rank on a node with its own disk would do: write its shard where rank 0 cannot read."""
    real_write, elsewhere = checkpoint._write_shard, tmp_path / "other-node"
    elsewhere.mkdir()
    monkeypatch.setattr(checkpoint, "_write_shard", lambda directory, name, tensors: real_write(
        elsewhere if name.startswith("optimizer") else directory, name, tensors))
    cfg = make_config(**AMOEBA, ckpt_dir=str(tmp_path / "ckpt"))
    run = build_run(cfg)
    with pytest.raises(CheckpointError, match=r"rank 0 cannot see .*optimizer-00001-of-00001\.safetensors "
                                              r"as rank 0 wrote it \(\d+ bytes; rank 0 sees nothing\)"):
        save_checkpoint(run, DataCursor(run.dataset, cfg.batch_size), 0, 1e-3)
    assert not (tmp_path / "ckpt" / "latest").exists() and not (tmp_path / "ckpt" / "step-000001").exists()
