"""Schedules as data, torch-free: `actions` turns (schedule, rank, K, M, V) into one rank's ordered
actions of a step; `check` simulates every rank's list (pairing, no deadlock, completeness, the
bubble) and draws the grid that `python -m minipipe.schedule` prints."""
