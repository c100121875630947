"""Schedules as data, torch-free: `actions` turns (schedule, rank, K, M, V) into one rank's ordered
actions of a step (`zero_bubble` holds the split-backward orders); `check` simulates every rank's
list (pairing, no deadlock, completeness, the bubble) and draws the grid that `python -m
minipipe.schedule` prints; `csv_format` reads and writes lists as torch's compute-only CSV files."""
