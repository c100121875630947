"""Sharded safetensors checkpoints: save, verify, load into any cut of the model, atomically.

    ckpt-dir/latest                     the name of the newest complete checkpoint
    ckpt-dir/step-000100/               the state after 100 optimizer steps
        model-00001-of-00002.safetensors     one shard per stage: parameters and buffers
        optimizer-00001-of-00002.safetensors per parameter: `{name}.step`, `.exp_avg`, `.exp_avg_sq`
        model.safetensors.index.json         {"metadata": {"total_size"}, "weight_map": {name: file}}
        optimizer.safetensors.index.json     the same for the optimizer shards
        trainer_state.json                   step, config, cut, data cursor, RNG, sha256 per file

Invariants:
- Names are global (`layers.7.qkv.weight`), so a checkpoint of K stages x dp replicas loads into
  any K' x dp': each stage reads only its own tensors, finding their files through the index.
  A tied weight is stored once, under its source's name (the Transformer's
  `layers.0.tokens.weight`; minipipe/pipeline/tied.py).
- A checkpoint is complete or invisible: it is written under `.tmp-step-N`, fsynced, renamed to
  `step-N`, and only then named by `latest` (itself replaced atomically).
- Loading verifies everything this rank reads (config, names, shapes, sizes, sha256: see
  checkpoint_files.py), and all ranks agree on the verdict, before anything is copied into the
  model. Only safetensors and JSON are read: nothing is unpickled.
"""
import base64
import dataclasses
import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import save_file

from minipipe.checkpoint.directory import (
    DirectoryClaim,
    agreed_resume_path,
    claim_checkpoint_dir,
    fsync,
    prune,
    publish,
    start_step_directory,
)
from minipipe.checkpoint.files import (
    FORMAT_VERSION,
    INDEX_FILES,
    LATEST,
    TRAINER_STATE,
    check_data_order,
    check_model_shape,
    digest,
    read_index,
    read_tensors,
    read_trainer_state,
)
from minipipe.errors import CheckpointError
from minipipe.models import registry
from minipipe.pipeline import tied
from minipipe.pipeline.collectives import collective, from_rank0, raise_first, to_rank0
from minipipe.pipeline.optim import lr_at


# ---- the training loop's view ----------------------------------------------------------------
class Checkpointer:
    """Claim --ckpt-dir and resume at the start; save every --ckpt-every steps, at the end, and at
    the step boundary after a SIGTERM or a Ctrl-C (SIGINT; a second Ctrl-C stops at once, without
    saving). Saving (and the signal handlers) is on only with --ckpt-dir."""

    STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, run, cursor):
        self.run, self.cursor, self.cfg = run, cursor, run.cfg
        self.enabled = self.cfg.ckpt_dir is not None
        self.sigterm_received = False  # on this rank: a SIGTERM or SIGINT asked to stop
        self.stopped = False  # agreed by every rank: the run ended early at a step boundary
        self.claim, self.claimed = DirectoryClaim(None, ""), False
        self._previous_handlers = ({sig: signal.signal(sig, self._on_stop_signal)
                                    for sig in self.STOP_SIGNALS} if self.enabled else {})

    def _on_stop_signal(self, signum, frame):
        self.sigterm_received = True
        if signum == signal.SIGINT:  # the next Ctrl-C interrupts at once
            signal.signal(signal.SIGINT, signal.default_int_handler)
            os.write(2, b"interrupted: saving a checkpoint at the end of this step "
                        b"(Ctrl-C again to stop without saving)\n")

    def resume(self) -> int:
        """Restore the checkpoint --resume names (if any; rank 0 decides which, every rank checks
        it reads the same step), then claim --ckpt-dir (see checkpoint_dir.py), which checks that
        every rank shares it; returns the first step to run. Saving needs the claim first."""
        path = agreed_resume_path(self.cfg, self.run.layout)
        step = None if path is None else load_checkpoint(self.run, self.cursor, path)  # read only
        if self.enabled:
            self.claim = claim_checkpoint_dir(self.cfg, self.run.layout, path)
            self.claimed = True
        if path is None:
            return 0
        if self.run.layout.rank == 0:
            print(f"resumed from {path} (the state after step {step + 1})", flush=True)
            saved_steps = read_trainer_state(path)["config"]["steps"]
            if saved_steps != self.cfg.steps and step + 1 < self.cfg.steps:
                print(schedule_change(saved_steps, self.cfg, step + 1), flush=True)
        return step + 1

    def after_step(self, step: int, lr: float, last: bool) -> bool:
        """Save if due (always at the run's last step); True when the run must stop here (a
        SIGTERM reached any rank)."""
        if not self.enabled:
            return False
        if not self.claimed:  # the claim proved every rank writes where rank 0 reads
            raise RuntimeError("a checkpoint save before resume() claimed --ckpt-dir")
        self.stopped = self._any_rank_stopping()
        done, every = step + 1, self.cfg.ckpt_every
        if self.stopped or last or (every and done % every == 0):
            path = save_checkpoint(self.run, self.cursor, step, lr)
            if self.run.layout.rank == 0:
                print(f"saved checkpoint {path}", flush=True)
        return self.stopped

    def _any_rank_stopping(self) -> bool:
        """One tiny all-reduce per step, so every rank stops at the same step boundary."""
        if self.run.layout.world_size == 1:
            return self.sigterm_received
        lay = self.run.layout
        flag = torch.tensor([float(self.sigterm_received)], device=lay.device)
        collective(lay, "every rank to agree whether to stop after this step",  # a peer may have died
                   lambda: dist.all_reduce(flag, op=dist.ReduceOp.MAX), timeout_s=self.cfg.timeout)
        return bool(flag.item())

    def close(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers = {}
        self.claim.release()


# ---- save ---------------------------------------------------------------------------------------
def schedule_change(saved_steps: int, cfg, first_step: int) -> str:
    """The learning-rate schedule spans --steps, so resuming under another --steps re-plans the
    cosine from here on: say where it now ends and what the next step's rate becomes."""
    before = lr_at(first_step, dataclasses.replace(cfg, steps=saved_steps))
    return (f"note: the checkpoint's run had --steps {saved_steps}, this one --steps {cfg.steps}: the "
            f"cosine learning-rate schedule now reaches --min-lr {cfg.min_lr:g} at step {cfg.steps} "
            f"instead of {saved_steps}, so step {first_step + 1} trains at lr {lr_at(first_step, cfg):.3e} "
            f"(it would have been {before:.3e})")


# A rank that fails mid-save (disk full, killed) surfaces in the save's next collective.
SAVING = dict(error=CheckpointError, consequence=", and the previous checkpoint is intact")


def save_checkpoint(run, cursor, step: int, lr: float) -> Path:
    """Every rank calls this after step `step`; returns the path once the checkpoint is complete
    and `latest` names it (older ones beyond --keep are then pruned)."""
    lay, root = run.layout, Path(run.cfg.ckpt_dir)
    final = root / f"step-{step + 1:06d}"
    tmp = root / f".tmp-{final.name}"
    problem = None
    if lay.rank == 0:
        try:
            start_step_directory(tmp)
        except CheckpointError as err:
            problem = str(err)
    problem = from_rank0(lay, [problem], f"every rank to start checkpoint {final.name}", **SAVING)[0]
    if problem:
        raise CheckpointError(problem)
    report = {"rng": _rng_state(lay.device)}
    if lay.dp_rank == 0:  # replicas hold equal tensors: one copy per stage
        tie = registry.tied_weight(run.cfg)
        shards = {"model": tied.drop_copy(tie, run.stage.state_dict()),  # a tied weight once
                  "optimizer": tied.drop_copy(tie, optimizer_tensors(run.stage, run.optimizer))}
        for kind, tensors in shards.items():  # 1-based, as in model-00001-of-00004.safetensors
            file_name = f"{kind}-{lay.stage + 1:05d}-of-{lay.n_stages:05d}.safetensors"
            with _write_failure_reported(root, tmp / file_name, lay):
                report[kind] = _write_shard(tmp, file_name, tensors)
    reports = to_rank0(lay, report, f"every rank to write its shards of {final.name}", **SAVING)
    problem = None
    if lay.rank == 0:
        try:
            _check_shards_visible(tmp, reports)
            with _write_failure_reported(root, tmp / TRAINER_STATE, lay):
                _write_trainer_state(run, cursor, step, lr, tmp, reports)
            publish(root, tmp, final)
            prune(root, run.cfg.keep)
        except CheckpointError as err:
            problem = str(err)
    problem = from_rank0(lay, [problem], f"every rank to see {final.name} published", error=CheckpointError)[0]
    if problem:  # rank 0's verdict: every rank stops with the same message
        raise CheckpointError(problem)
    return final


def optimizer_tensors(stage, optimizer) -> dict:
    """AdamW state under global names: `{param name}.{state key}`."""
    names = {id(p): name for name, p in stage.named_parameters()}
    return {f"{names[id(p)]}.{key}": value for p, state in optimizer.state.items()
            for key, value in state.items()}


def _check_shards_visible(tmp: Path, reports: list) -> None:
    """Rank 0, before publishing: every shard another rank wrote is here, whole. The claim's probe
    proved the filesystem shared; this keeps a checkpoint from naming a file rank 0 cannot read."""
    for rank, report in enumerate(reports):
        for shard in (report[kind] for kind in INDEX_FILES if kind in report):
            path = tmp / shard["file"]
            size = path.stat().st_size if path.is_file() else None
            if size != shard["bytes"]:
                raise CheckpointError(
                    f"rank 0 cannot see {path} as rank {rank} wrote it ({shard['bytes']} bytes; "
                    f"rank 0 sees {'nothing' if size is None else f'{size} bytes'}); a multi-node "
                    f"run needs --ckpt-dir on a filesystem every node shares; nothing was published")


def _write_shard(directory: Path, file_name: str, tensors: dict) -> dict:
    path = directory / file_name
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    save_file(tensors, path, metadata={"format": "pt"})
    fsync(path)  # save_file renames into place but does not fsync
    return {"file": file_name, "names": sorted(tensors), **digest(path),
            "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values())}


def _write_trainer_state(run, cursor, step, lr, directory: Path, reports: list) -> None:
    files = {}
    for kind, index_name in INDEX_FILES.items():
        shards = [r[kind] for r in reports if kind in r]
        index = {"metadata": {"total_size": sum(s["tensor_bytes"] for s in shards)},
                 "weight_map": {name: s["file"] for s in shards for name in s["names"]}}
        _write_json(directory / index_name, index)
        files.update({s["file"]: {"sha256": s["sha256"], "bytes": s["bytes"]} for s in shards})
        files[index_name] = digest(directory / index_name)
    lay = run.layout
    _write_json(directory / TRAINER_STATE, {
        "format_version": FORMAT_VERSION,
        "step": step,  # the last completed step (0-based, as in the metrics); resume runs step + 1
        "lr": lr,  # the schedule's value at `step`; lr_at(step, config) recomputes it
        "config": run.cfg.to_dict(),
        "balance": run.balance,  # layers per model chunk (K*V, on stages spec.placement) of this run
        "world": {"stages": lay.n_stages, "dp": lay.dp},
        "data_cursor": cursor.state_dict(),
        "loss_scale": [run.engine.scale.scale, run.engine.scale.steps_at_scale],  # float16; else [1.0, n]
        "rng": [r["rng"] for r in reports],  # by rank
        "files": dict(sorted(files.items())),
    })
    fsync(directory)


@contextmanager
def _write_failure_reported(root: Path, path: Path, lay):
    """A failed write (disk full, quota, I/O error) becomes a CheckpointError that says the
    previous checkpoint is intact; the partial file is removed so that it does not hold the space."""
    try:
        yield
    except (OSError, SafetensorError) as err:
        path.unlink(missing_ok=True)
        latest = root / LATEST
        previous = (f"the previous checkpoint {root / latest.read_text().strip()} is intact and "
                    f"`{LATEST}` still names it" if latest.is_file() else
                    "no earlier checkpoint of this run exists")
        raise CheckpointError(f"rank {lay.rank}: saving {path} failed ({err}); {previous}; free "
                              f"disk space (or fix --ckpt-dir) and resume with --resume auto") from err


# ---- resume and load -------------------------------------------------------------------------
def load_checkpoint(run, cursor, path: Path) -> int:
    """Verify, then restore weights, buffers, optimizer state, data cursor and (same layout only)
    RNG states; returns the checkpoint's step. A problem found by any rank raises the same
    CheckpointError on every rank before anything is copied into the model."""
    lay = run.layout
    try:
        state = read_trainer_state(path)
        check_model_shape(state, run.cfg, path)
        weights, optimizer_state = _read_stage_tensors(path, state, run.stage, run.cfg)
        check_data_order(state, run.cfg, path)  # after the shapes: another model says more
        problem = None
    except CheckpointError as err:
        problem = f"rank {lay.rank} (stage {lay.stage}): {err}"
    raise_first(lay, problem, f"every rank to verify {path}", CheckpointError)
    cursor.load_state_dict(state["data_cursor"])
    run.stage.load_state_dict(weights)
    _load_optimizer_tensors(run.stage, run.optimizer, optimizer_state)
    run.engine.scale.scale, run.engine.scale.steps_at_scale = state.get("loss_scale", [run.engine.scale.scale, 0])
    if state["world"] == {"stages": lay.n_stages, "dp": lay.dp}:
        _set_rng_state(state["rng"][lay.rank], lay.device)
    return state["step"]


def _read_stage_tensors(path: Path, state: dict, stage, cfg) -> tuple[dict, dict]:
    """This stage's weights and buffers, and the optimizer state of its parameters, under this
    stage's names (a tied head's copy is read from the tied weight's one stored name)."""
    tie = registry.tied_weight(cfg)
    stored = {name: tied.stored_name(tie, name) for name in stage.state_dict()}
    shapes = {stored[name]: t.shape for name, t in stage.state_dict().items()}
    read = read_tensors(path, "model", read_index(path, "model", state), state, shapes)
    weights = {name: read[stored[name]] for name in stored}
    own = dict(stage.named_parameters())
    param_of = {tied.stored_name(tie, name): name for name in own}  # stored name -> this stage's
    optimizer_map = read_index(path, "optimizer", state)
    wanted = {}
    for name in optimizer_map:
        param_name, _, key = name.rpartition(".")
        # AdamW: a scalar step, moments shaped like the parameter; any other key is not read
        if param_name in param_of and key in ("step", "exp_avg", "exp_avg_sq"):
            wanted[name] = () if key == "step" else own[param_of[param_name]].shape
    optimizer_state = {}
    for name, value in read_tensors(path, "optimizer", optimizer_map, state, wanted).items():
        param_name, key = name.rsplit(".", 1)
        optimizer_state[f"{param_of[param_name]}.{key}"] = value
    return weights, optimizer_state


def _load_optimizer_tensors(stage, optimizer, tensors: dict) -> None:
    """Through optimizer.load_state_dict, which casts moments to each parameter's device/dtype."""
    params = dict(stage.named_parameters())
    position = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    per_param = {}
    for name, value in tensors.items():
        param_name, key = name.rsplit(".", 1)
        per_param.setdefault(position[id(params[param_name])], {})[key] = value
    state_dict = optimizer.state_dict()
    state_dict["state"] = per_param
    optimizer.load_state_dict(state_dict)


# ---- small helpers ---------------------------------------------------------------------------
def _rng_state(device: torch.device) -> dict:
    def encode(state):
        return base64.b64encode(state.cpu().numpy().tobytes()).decode()
    return {"torch": encode(torch.get_rng_state()),
            "cuda": encode(torch.cuda.get_rng_state(device)) if device.type == "cuda" else None}


def _set_rng_state(saved: dict, device: torch.device) -> None:
    def decode(text):
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
    torch.set_rng_state(decode(saved["torch"]))
    if saved["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(decode(saved["cuda"]), device)


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1) + "\n")
    fsync(path)
