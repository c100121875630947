"""minipipe training entry point.

    python train.py                                  # one process: M micro-batches = accumulation
    torchrun --standalone --nproc_per_node=2 train.py --microbatches 4   # two pipeline stages
    python train.py --help                           # every flag

The loop is a straight line: batch from the data cursor -> one GPipe step on every stage ->
metrics on rank 0 -> periodic validation -> optional sample at the end.
"""
import sys
import time

import torch
import torch.distributed as dist

from minipipe.build import build_run, plan_table
from minipipe.config import Config, parse_config
from minipipe.data import DataCursor
from minipipe.errors import MinipipeError
from minipipe.metrics import ConsoleBackend, JsonlBackend, MetricsLogger
from minipipe.optim import lr_at


def make_logger(cfg: Config, rank: int) -> MetricsLogger:
    if rank != 0:
        return MetricsLogger([])
    backends = [ConsoleBackend(cfg.steps, cfg.log_every)]
    if cfg.metrics_jsonl:
        backends.append(JsonlBackend(cfg.metrics_jsonl))
    return MetricsLogger(backends)


def validation_loss(run) -> float:
    cfg = run.cfg
    batches = (run.dataset.batch(i, cfg.batch_size, split="val") for i in range(cfg.eval_batches))
    return run.engine.evaluate(batches)


def train(cfg: Config, logger: MetricsLogger | None = None) -> dict:
    """Train for cfg.steps; returns {"losses", "val_losses", "sample"} (the same on every rank)."""
    run = build_run(cfg)
    rank = run.layout.rank
    logger = logger or make_logger(cfg, rank)
    logger.config(cfg.to_dict())
    if rank == 0:
        print(plan_table(run), flush=True)
    cursor = DataCursor(run.dataset, cfg.batch_size)
    units_per_sample = cfg.seq_len if cfg.model == "transformer" else 1
    history = {"losses": [], "val_losses": [], "sample": None}
    for step in range(cfg.steps):
        inputs, targets = cursor.next_batch()
        started = time.perf_counter()
        lr = lr_at(step, cfg)
        result = run.engine.train_step(inputs, targets, step, lr, cfg.grad_clip)
        elapsed = time.perf_counter() - started
        history["losses"].append(result["loss"])
        rate_key = "tokens_per_s" if cfg.model == "transformer" else "samples_per_s"
        logger.log(step, {"loss": result["loss"], "lr": lr, "grad_norm": result["grad_norm"],
                          "step_time_s": elapsed,
                          rate_key: cfg.batch_size * units_per_sample / elapsed})
        last_step = step + 1 == cfg.steps
        if last_step or (cfg.eval_every and (step + 1) % cfg.eval_every == 0):
            val = validation_loss(run)
            history["val_losses"].append((step, val))
            logger.log(step, {"val_loss": val})
    if cfg.sample and cfg.model == "transformer":
        history["sample"] = sample_text(run)
        if rank == 0:
            print(f"--- sample ({cfg.sample} tokens) ---\n{history['sample']}\n---", flush=True)
    logger.close()
    return history


def sample_text(run) -> str:
    cfg = run.cfg
    prompt, _ = run.dataset.batch(0, 1, split="val")
    prompt = prompt[:, : min(32, cfg.seq_len // 2)]
    new = run.engine.generate(prompt, cfg.sample, cfg.max_seq_len, seed=cfg.seed)
    ids = torch.cat([prompt[0], new]).tolist()
    if cfg.vocab <= 256:
        return bytes(ids).decode("utf-8", errors="replace")
    return " ".join(map(str, ids))


def main(argv=None) -> int:
    try:
        cfg = parse_config(argv)
        train(cfg)
    except MinipipeError as err:
        rank = dist.get_rank() if dist.is_initialized() else 0
        print(f"minipipe error (rank {rank}): {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
