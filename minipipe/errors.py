"""One error type per failure class; every message says what is wrong and what to do."""


class MinipipeError(Exception):
    """Base class: anything minipipe refuses with a message meant for the user."""


class ConfigError(MinipipeError):
    """A flag, preset or config file asks for something impossible (raised before any process waits)."""


class HFModelError(ConfigError):
    """A Hugging Face directory that minipipe cannot hold exactly, or whose tensors are wrong."""


class DataError(MinipipeError):
    """A data path is missing, empty or inconsistent with the model (e.g. token ids >= vocab)."""


class PipelineError(MinipipeError):
    """A stage-to-stage exchange failed: timeout, dead peer, or a header that does not match."""


class CheckpointError(MinipipeError):
    """A checkpoint is missing, truncated, corrupt, or belongs to another model."""


# What torch.distributed says when a wait fails, by backend and cause -> the reason minipipe
# prints, matched without regard to case. Texts as torch 2.13 writes them: gloo ("Timed out
# waiting 3000ms for recv operation to complete", "Connection closed by peer [host]:port",
# "Connection reset by peer"); NCCL's ProcessGroupNCCL and NCCLUtils ("[Rank 0] Watchdog caught
# collective operation timeout: WorkNCCL(...) ran for 600081 milliseconds before timing out.",
# "... timed out in blocking wait (TORCH_NCCL_BLOCKING_WAIT=1).", "NCCL communicator was aborted
# on rank 2. Original reason for failure was: ...", and the ncclResult texts "ncclRemoteError: A
# call failed possibly due to a network error or a remote process exiting prematurely.",
# "ncclSystemError: System call (e.g. socket, malloc) or external library call failed or device
# error.", "ncclInternalError: Internal check failed."). First match wins: a lost peer or a
# timeout is named before an aborted communicator, whose text quotes the failure that aborted it.
_COMM_FAILURES = (
    (("Connection closed", "Connection reset"), "lost the connection (the peer process exited or crashed)"),
    (("ncclRemoteError",), "lost the connection (NCCL: a peer process exited or the network failed)"),
    (("timed out", "collective operation timeout"), "timed out after {timeout}"),
    (("NCCL communicator was aborted",),
     "found the NCCL communicator aborted (an earlier operation failed or timed out)"),
    (("ncclSystemError",), "failed in NCCL (ncclSystemError: a system call or the network failed, "
                           "or a peer exited)"),
    (("ncclInternalError",), "failed in NCCL (ncclInternalError)"),
)


def describe_comm_failure(exc: BaseException, timeout_s: float | None = None) -> str:
    """The reason a torch.distributed wait failed, for a PipelineError or CheckpointError:
    `timed out after 30 s`, `lost the connection (...)`, or `failed (<first line of the error>)`.
    exc: the RuntimeError / torch.distributed.DistBackendError that a Work.wait or a collective
    raised; timeout_s: the bound that was waited, named in a timeout's reason."""
    text = str(exc)
    for needles, reason in _COMM_FAILURES:
        if any(needle.lower() in text.lower() for needle in needles):
            return reason.format(timeout=f"{timeout_s:g} s" if timeout_s is not None else "the timeout")
    return f"failed ({text.splitlines()[0] if text else type(exc).__name__})"
