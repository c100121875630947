"""What a run reports: step metrics to the console, JSONL and wandb (metrics), and the measured
pipeline timeline of traced steps (timeline)."""
