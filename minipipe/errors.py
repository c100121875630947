"""One error type per failure class; every message says what is wrong and what to do."""


class MinipipeError(Exception):
    """Base class: anything minipipe refuses with a message meant for the user."""


class ConfigError(MinipipeError):
    """A flag, preset or config file asks for something impossible (raised before any process waits)."""


class DataError(MinipipeError):
    """A data path is missing, empty or inconsistent with the model (e.g. token ids >= vocab)."""


class PipelineError(MinipipeError):
    """A stage-to-stage exchange failed: timeout, dead peer, or a header that does not match."""


class CheckpointError(MinipipeError):
    """A checkpoint is missing, truncated, corrupt, or belongs to another model."""
