"""A --ckpt-dir belongs to one run at a time, and minipipe deletes only what it wrote there.

Claimed at start-up, before the first step, by `claim_checkpoint_dir` (every rank calls it):
- the path must be (or become) a writable directory;
- a fresh run (--resume none, or auto with nothing to resume) is refused in a directory that
  holds another run's checkpoints, unless --overwrite-ckpt: the two runs would mix, and --keep
  would prune the old run's checkpoints;
- a lock file (`minipipe.lock`: host, pid, start time) refuses a second concurrent run. A lock
  left by a dead process on this host is taken over, with a message; one from another host is
  reported with the command to remove it;
- every rank writes a probe file that rank 0 must then see: a --ckpt-dir that is not shared by
  every node (multi-node runs need a shared filesystem) is refused here, not at the first save.

Which checkpoint a run resumes is decided once, by rank 0 (`agreed_resume_path`): it resolves
--resume (auto reads `latest`, which a save may replace at any moment) and every rank takes its
step directory; then every rank reads that directory's step itself, and any rank that reads
another step, or nothing, fails every rank with the same CheckpointError before anything loads.

A checkpoint is recognised by its trainer_state.json (see `is_checkpoint`): pruning and the fresh
run check never count, move or delete anything else, such as a user's `step-7/notes.txt`.
Deleting is file by file (`remove_written`): only names a save writes, then the directory if that
left it empty, so no path through a save, a publish or a prune can take a file minipipe did not
write. A step directory this run would save again (resuming from an earlier step) that holds
anything else is refused by name before training (`_check_resaved_steps`).
"""
import json
import os
import socket
import sys
import time
from pathlib import Path

from minipipe.checkpoint.files import (
    LATEST,
    STEP_DIR,
    TRAINER_STATE,
    WRITTEN_FILE,
    checkpoint_path,
    file_inside,
    read_trainer_state,
)
from minipipe.errors import CheckpointError
from minipipe.pipeline.collectives import from_rank0, gathered

LOCK = "minipipe.lock"
PROBE = ".probe-rank{}"
CLAIM = "every rank to claim --ckpt-dir"  # what the claim's collectives wait for
RESUME = "every rank to agree on the checkpoint to resume"
SHARED_FS = ("a multi-node run needs --ckpt-dir (and any --resume PATH) on a filesystem every "
             "node shares")


def is_checkpoint(path: Path) -> bool:
    """A step directory this layout wrote: `step-N/` holding trainer_state.json."""
    return STEP_DIR.match(path.name) is not None and (path / TRAINER_STATE).is_file()


def holds_only_checkpoint_files(path: Path) -> bool:
    """The step directory holds nothing but the files its trainer_state.json records: safe to
    delete whole. Anything else (a user's notes, an unreadable state) keeps it from pruning."""
    try:
        recorded = set(json.loads(file_inside(path, TRAINER_STATE).read_bytes())["files"])
    except (OSError, ValueError, KeyError, TypeError, CheckpointError):
        return False
    return all(p.is_file() and p.name in recorded | {TRAINER_STATE} for p in path.iterdir())


def remove_written(path: Path) -> bool:
    """Delete the files a save writes (by name) in `path`, then `path` if that emptied it; True
    when it is gone. Anything else in it (a user's file, a symlink, a folder) stays, and so does
    the directory."""
    if not path.is_dir() or path.is_symlink():
        return not path.exists() and not path.is_symlink()
    for entry in path.iterdir():
        if WRITTEN_FILE.match(entry.name) and entry.is_file() and not entry.is_symlink():
            entry.unlink()
    try:
        path.rmdir()
    except OSError:
        return False
    return True


def checkpoints_in(root: Path) -> list[Path]:
    """The checkpoints directly under root, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if is_checkpoint(p)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


class DirectoryClaim:
    """What rank 0 holds while the run lasts: the lock file, removed by `release`."""

    def __init__(self, lock: Path | None, token: str):
        self.lock, self.token = lock, token

    def release(self) -> None:
        if self.lock is None:
            return
        try:
            if json.loads(self.lock.read_text()).get("token") == self.token:
                self.lock.unlink()
        except (OSError, ValueError):
            pass  # already gone or replaced: nothing of ours to remove
        self.lock = None


def claim_checkpoint_dir(cfg, layout, resume_from: Path | None) -> DirectoryClaim:
    """Every rank: refuse (the same CheckpointError on every rank) or return the claim; rank 0
    holds the lock. resume_from: the checkpoint this run continues, None for a fresh run."""
    root = Path(cfg.ckpt_dir)
    claim, problem = DirectoryClaim(None, ""), None
    if layout.rank == 0:
        try:
            _check_directory(root)
            _check_fresh_run(cfg, root, resume_from)
            _check_resaved_steps(cfg, root, resume_from)
            claim = _lock(root)
        except CheckpointError as err:
            problem = str(err)
    token, problem = from_rank0(layout, [claim.token, problem], CLAIM, error=CheckpointError)
    if problem:
        raise CheckpointError(problem)
    try:  # each rank says "I can write here"; rank 0 checks that it sees every rank's word
        (root / PROBE.format(layout.rank)).write_text(token)
        problem = None
    except OSError as err:
        problem = (f"rank {layout.rank} cannot write in --ckpt-dir {root}, which rank 0 created "
                   f"({err.strerror}); {SHARED_FS}, writable by every rank")
    problems = gathered(layout, problem, CLAIM, error=CheckpointError)
    if layout.rank == 0:
        problem = next((p for p in problems if p), None) or _check_probes(root, layout, token)
    problem = from_rank0(layout, [problem], CLAIM, error=CheckpointError)[0]
    try:  # a probe rank 0 could not see (another node's filesystem) is its writer's to remove
        (root / PROBE.format(layout.rank)).unlink(missing_ok=True)
    except OSError:
        pass
    if problem:
        claim.release()
        raise CheckpointError(problem)
    return claim


def _check_directory(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"--ckpt-dir {root} is a file, not a directory; pass a directory path")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"--ckpt-dir {root} cannot be created ({err.strerror}); pass a "
                              f"writable directory") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise CheckpointError(f"--ckpt-dir {root} is not writable; pass a directory you can write to")


def _check_fresh_run(cfg, root: Path, resume_from: Path | None) -> None:
    """A run that does not continue this directory's checkpoints must not mix with them."""
    if cfg.overwrite_ckpt:
        return
    if resume_from is not None and resume_from.resolve().parent == root.resolve():
        return  # continuing (or branching from) this directory's own run
    existing = checkpoints_in(root)
    if not existing:
        return
    names = ", ".join(p.name for p in existing[-3:]) + (" ..." if len(existing) > 3 else "")
    start = "starts fresh" if resume_from is None else f"resumes from {resume_from}"
    if cfg.resume == "auto":  # (it was passed, or is the default: no `latest` names a step there)
        how = f"--resume auto found no `{LATEST}` there: pass --resume {existing[-1]}"
    else:
        how = "pass --resume auto (or one of its step directories)"
    raise CheckpointError(
        f"--ckpt-dir {root} holds checkpoints of another run ({names}) and this run {start} "
        f"(--resume {cfg.resume}); to continue that run {how}, or use another --ckpt-dir, or "
        f"pass --overwrite-ckpt to start over there (--keep may then delete the old checkpoints)")


def _check_resaved_steps(cfg, root: Path, resume_from: Path | None) -> None:
    """A step directory this run will save again must be one minipipe may replace: a checkpoint
    holding only its own files. Refused before the first step, not after training up to it."""
    start = 0
    if resume_from is not None and resume_from.resolve().parent == root.resolve():
        named = STEP_DIR.match(resume_from.name)  # (a step directory the user renamed: from 0)
        start = int(named.group(1)) if named else 0
    in_the_way = [p.name for p in sorted(root.iterdir())
                  if STEP_DIR.match(p.name) and p.name == f"step-{int(p.name[5:]):06d}"
                  and start < int(p.name[5:]) <= cfg.steps
                  and not (is_checkpoint(p) and holds_only_checkpoint_files(p))]
    if in_the_way:
        raise CheckpointError(
            f"--ckpt-dir {root}: this run would save {', '.join(in_the_way[:3])} again, and "
            f"{'it holds' if len(in_the_way) == 1 else 'they hold'} files minipipe did not write "
            f"(or {'is' if len(in_the_way) == 1 else 'are'} not a checkpoint); move those files "
            f"out, or use another --ckpt-dir")


def _lock(root: Path) -> DirectoryClaim:
    host, pid = socket.gethostname(), os.getpid()
    token = f"{host}:{pid}:{time.time_ns()}"
    record = json.dumps({"host": host, "pid": pid, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                         "token": token}) + "\n"
    lock = root / LOCK
    for _ in range(2):  # a second try after taking over a dead process's lock
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _take_over_if_dead(lock, host)
            continue
        except OSError as err:
            raise CheckpointError(f"--ckpt-dir {root}: cannot create the lock file ({err.strerror}); "
                                  f"pass a writable directory") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(record)
        return DirectoryClaim(lock, token)
    raise CheckpointError(f"--ckpt-dir {root}: another run took the lock {lock} at the same time")


def _take_over_if_dead(lock: Path, host: str) -> None:
    """Remove a lock whose holder is a dead process on this host; refuse any other."""
    try:
        holder = json.loads(lock.read_text())
        held_by = f"host {holder['host']}, pid {holder['pid']}, since {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        holder, held_by = None, "unreadable"
    if holder and holder["host"] == host and not _alive(int(holder["pid"])):
        print(f"note: --ckpt-dir lock {lock} was left by pid {holder['pid']}, which is no longer "
              f"running; taking it over", file=sys.stderr, flush=True)
        lock.unlink(missing_ok=True)
        return
    raise CheckpointError(
        f"--ckpt-dir {lock.parent} is in use by another run (lock {lock}: {held_by}); wait for "
        f"it to finish or use another --ckpt-dir; if that run is gone, delete {lock}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _check_probes(root: Path, layout, token: str) -> str | None:
    """Rank 0: every rank's probe is visible here with this run's token; then remove them."""
    missing = []
    for rank in range(layout.world_size):
        probe = root / PROBE.format(rank)
        try:
            seen = probe.read_text() == token
            probe.unlink()
        except OSError:
            seen = False
        if not seen:
            missing.append(rank)
    if missing:
        return (f"--ckpt-dir {root}: rank 0 cannot see the files that ranks {missing} wrote "
                f"there; {SHARED_FS}")
    return None


# ---- which checkpoint to resume ------------------------------------------------------------
def resume_path(cfg) -> Path | None:
    """The checkpoint --resume asks for, as this process sees it: none; auto = `latest` of
    --ckpt-dir if there is one; or a PATH (a step directory, or a checkpoint directory whose
    `latest` is taken)."""
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        if cfg.ckpt_dir is None or not (Path(cfg.ckpt_dir) / LATEST).exists():
            return None
        return checkpoint_path(cfg.ckpt_dir)
    return checkpoint_path(cfg.resume)


def agreed_resume_path(cfg, layout) -> Path | None:
    """Every rank: rank 0's `resume_path`, once every rank has checked that it reads the same
    step there; otherwise the same CheckpointError on every rank."""
    decision = [None, None, None]  # step directory, its step, or the problem rank 0 found
    if layout.rank == 0:
        try:
            path = resume_path(cfg)
            decision = [None if path is None else str(path),
                        None if path is None else read_trainer_state(path)["step"], None]
        except CheckpointError as err:
            decision = [None, None, str(err)]
    path, step, problem = from_rank0(layout, decision, RESUME, error=CheckpointError)
    if problem:
        raise CheckpointError(problem)
    if path is None:
        return None
    try:  # each rank reads the step itself: a node with another view of the path shows here
        seen = read_trainer_state(Path(path))["step"]
    except CheckpointError as err:
        seen = f"cannot read it ({err})"
    problem = disagreement(path, step, gathered(layout, seen, RESUME, error=CheckpointError))
    if problem:
        raise CheckpointError(problem)
    return Path(path)


def disagreement(path: str, step: int, seen_by_rank: list) -> str | None:
    """None when every rank read `step` in `path`; else the message every rank raises."""
    others = [f"rank {rank} {'sees step ' + str(seen) if isinstance(seen, int) else seen}"
              for rank, seen in enumerate(seen_by_rank) if seen != step]
    if not others:
        return None
    return (f"the ranks disagree on the checkpoint to resume: rank 0 resumes {path} at step {step}, "
            f"but {'; '.join(others)}; {SHARED_FS} (or the same checkpoint copied to that path on "
            f"every node), then run again")


# ---- a save's directories: started empty, published atomically, pruned -----------------------
def start_step_directory(tmp: Path) -> None:
    """An empty `.tmp-step-N`: what a save killed at this step left there is removed first."""
    if not remove_written(tmp):
        raise CheckpointError(f"cannot save into {tmp}: it holds files minipipe did not write; "
                              f"move them out and resume with --resume auto")
    tmp.mkdir(parents=True)


def publish(root: Path, tmp: Path, final: Path) -> None:
    """Rename the complete step into place, then point `latest` at it. A step saved before (a
    resume from an earlier step) stays until the new one is in place, then only its own files go."""
    if (final.exists() or final.is_symlink()) and not (is_checkpoint(final)
                                                       and holds_only_checkpoint_files(final)):
        raise CheckpointError(f"cannot publish {final}: a file or directory of that name that "
                              f"holds files minipipe did not write is in the way; move it and "
                              f"resume (the step is saved under {tmp})")
    stale = root / f".old-{final.name}"
    if final.exists():  # this step was saved by an earlier run in the same directory
        if not remove_written(stale):
            raise CheckpointError(f"cannot publish {final}: {stale} holds files minipipe did not "
                                  f"write; move it and resume (the step is saved under {tmp})")
        final.rename(stale)
    tmp.rename(final)
    pointer = root / f"{LATEST}.tmp"
    try:
        pointer.write_text(final.name + "\n")
        fsync(pointer)
        os.replace(pointer, root / LATEST)
        fsync(root)
    except OSError as err:  # disk or inodes full: `latest` still names the previous step
        pointer.unlink(missing_ok=True)
        previous = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
        raise CheckpointError(
            f"saving {root / LATEST} failed ({err}); {final} is complete but `{LATEST}` still "
            f"names {previous or 'no step'}; free disk space (or inodes) and resume with "
            f"--resume {final}") from err
    remove_written(stale)


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (0 = all), never the one `latest` names; drop leftovers
    of killed saves. Only checkpoints count (is_checkpoint): a user's `step-7/notes.txt` or a file
    named `step-1` is neither counted nor touched."""
    for leftover in [*root.glob(".tmp-step-*"), *root.glob(".old-step-*")]:
        remove_written(leftover)
    if not keep:
        return
    latest = (root / LATEST).read_text().strip()
    others = sorted((p for p in root.iterdir() if is_checkpoint(p) and p.name != latest),
                    key=lambda p: int(STEP_DIR.match(p.name).group(1)))
    for old in others[:max(len(others) - (keep - 1), 0)]:
        if holds_only_checkpoint_files(old):
            remove_written(old)
        else:
            print(f"note: --keep {keep} leaves {old} in place: it holds files that are not part of "
                  f"the checkpoint", file=sys.stderr, flush=True)


def fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


