"""Test-wide settings."""
import os

# wandb's default here is offline, which writes a run directory per training job; tests that
# check wandb ask for it explicitly (--wandb offline), the rest write nothing.
os.environ.setdefault("WANDB_MODE", "disabled")
