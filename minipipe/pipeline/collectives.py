"""Every rank agrees, or every rank fails alike: the one home of minipipe's collectives.

A collective waits on every rank of its group. A peer that died, timed out or failed before it
reached the collective surfaces here as gloo's or NCCL's raw error; `collective` turns that into
a MinipipeError of the caller's class (PipelineError, CheckpointError, ...) that names this rank,
its stage, the step when there is one, and what it waited for, so no wait is anonymous.
Everything else here is built on it:

    from_rank0(layout, values, what)              rank 0's list, on every rank
    gathered(layout, value, what)                 every rank's value, by rank, on every rank
    to_rank0(layout, value, what)                 every rank's value on rank 0 (None elsewhere)
    raise_first(layout, problem, what, error)     every rank's verdict (None = fine) gathered;
                                                  the first problem raised on every rank alike

With one process the helpers return at once (no process group is needed for them); `collective`
itself always runs its call (the engine's tensor collectives also run in a one-rank group).
"""
import torch.distributed as dist

from minipipe.errors import MinipipeError, PipelineError, describe_comm_failure


def collective(layout, what: str, run, *, error: type[MinipipeError] = PipelineError, step: int | None = None,
               timeout_s: float | None = None, consequence: str = ""):
    """run() (a call of a torch.distributed collective, or a Work's wait); a RuntimeError from it
    becomes `error`: "rank R (stage S)[, step N]: waiting for <what> failed: <reason>; ...".
    `consequence` is added to the message (what survives, e.g. the previous checkpoint)."""
    try:
        return run()
    except RuntimeError as err:
        where = f"rank {layout.rank} (stage {layout.stage})" + ("" if step is None else f", step {step}")
        raise error(f"{where}: waiting for {what} failed: {describe_comm_failure(err, timeout_s)}; "
                    f"another rank probably failed or is stuck: the first error is in its log"
                    f"{consequence} (if it is only slow, raise --timeout)") from err


# `how`: collective's keywords (error, step, timeout_s, consequence).
def from_rank0(layout, values: list, what: str, **how) -> list:
    """Rank 0's `values` (a list of picklable objects, replaced in place), on every rank."""
    if layout.world_size > 1:
        collective(layout, what, lambda: dist.broadcast_object_list(values, src=0), **how)
    return values


def gathered(layout, value, what: str, **how) -> list:
    """Every rank's `value`, by rank, on every rank."""
    if layout.world_size == 1:
        return [value]
    values = [None] * layout.world_size
    collective(layout, what, lambda: dist.all_gather_object(values, value), **how)
    return values


def to_rank0(layout, value, what: str, **how) -> list | None:
    """Every rank's `value`, by rank, on rank 0; None on the other ranks."""
    if layout.world_size == 1:
        return [value]
    values = [None] * layout.world_size if layout.rank == 0 else None
    collective(layout, what, lambda: dist.gather_object(value, values, dst=0), **how)
    return values


def raise_first(layout, problem: str | None, what: str, error: type[MinipipeError]) -> None:
    """Each rank's verdict on its own part (None when fine) goes to every rank; the first problem,
    in rank order, is raised as `error` on every rank, so all stop with the same message before
    any of them acts on a part another rank found bad."""
    first = next((p for p in gathered(layout, problem, what, error=error) if p), None)
    if first:
        raise error(first)
