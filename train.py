"""minipipe training entry point.

    python train.py                                  # one process: M micro-batches = accumulation
    torchrun --standalone --nproc_per_node=2 train.py --microbatches 4   # two pipeline stages
    python train.py --help                           # every flag

The loop is a straight line: batch from the data cursor -> one GPipe step on every stage ->
metrics on rank 0 -> periodic validation -> optional sample at the end.
"""
import os
import sys
import time

import torch
import torch.distributed as dist

from minipipe.build import build_run, plan_table, warm_up_run
from minipipe.checkpoint.checkpointer import Checkpointer
from minipipe.checkpoint.hf_format import load_into_stage
from minipipe.command_line import parse_config
from minipipe.config import Config, traced_steps
from minipipe.data import DataCursor
from minipipe.dist import stop_with_launcher
from minipipe.errors import ConfigError, MinipipeError
from minipipe.inference import decode
from minipipe.models import registry
from minipipe.pipeline.optim import lr_at
from minipipe.plan import model_flops_per_unit
from minipipe.preflight import check_before_work
from minipipe.tracking import timeline
from minipipe.tracking.metrics import (
    MetricsLogger,
    compute_precision,
    config_record,
    flops_utilisation,
    make_logger,
)

STEP_LIMIT_ENV = "MINIPIPE_STEP_LIMIT"


def validation_loss(run) -> float:
    cfg = run.cfg
    batches = (run.dataset.batch(i, cfg.batch_size, split="val") for i in range(cfg.eval_batches))
    return run.engine.evaluate(batches)


def train(cfg: Config, logger: MetricsLogger | None = None) -> dict:
    """Train up to cfg.steps (from a checkpoint's next step when resuming); returns {"losses",
    "val_losses", "sample"} of the steps run here (the same on every rank)."""
    check_before_work(cfg)  # environment and output paths, on every rank, before any wait
    stop_with_launcher()  # a worker does not outlive a killed torchrun
    # Tracking starts before any rank waits on another: a slow wandb server delays rank 0 in the
    # rendezvous (bounded by --timeout), never in the middle of a step the other ranks wait on.
    logger = logger or make_logger(cfg, int(os.environ.get("RANK", "0")))
    try:
        run = build_run(cfg)
    except BaseException:
        logger.close()
        raise
    cfg, rank = run.cfg, run.layout.rank  # the settled config: the data's fields filled
    logger.config(config_record(cfg, run.balance, run.spec))
    if rank == 0:
        print(plan_table(run), flush=True)
    cursor = DataCursor(run.dataset, cfg.batch_size)
    checkpoints = Checkpointer(run, cursor)  # saves on schedule, at the end, on SIGTERM/SIGINT
    try:
        first_step = checkpoints.resume()  # claims --ckpt-dir first
        last = last_step_of_run(cfg, first_step)
        if first_step >= cfg.steps and rank == 0:
            print(f"nothing to train: the checkpoint already holds step {first_step} of --steps "
                  f"{cfg.steps} (raise --steps to train on)", flush=True)
        traced, on_cuda = traced_steps(cfg), run.layout.device.type == "cuda"
        if first_step == 0 and cfg.init_from:  # a checkpoint to resume wins: a restarted fine-tune goes on
            load_into_stage(run)
            if rank == 0:
                print(f"initialised from {cfg.init_from}", flush=True)
        family = registry.family(cfg)
        if on_cuda:  # compile and autotune before any exchange (CPU: torch ops, nothing to compile)
            seconds = warm_up_run(run)
            if rank == 0:
                print(f"warm-up: every kernel of stage 0 ran once in {seconds:.1f} s", flush=True)
        history = {"losses": [], "val_losses": [], "sample": None}
        flops_per_unit = model_flops_per_unit(cfg, spec=run.spec) if rank == 0 else 0.0
        device_name = torch.cuda.get_device_name(run.layout.device) if on_cuda else "cpu"
        precision = compute_precision(cfg.dtype, tf32=on_cuda)  # build_run allows TF32 on CUDA
        for step in range(first_step, last):
            inputs, targets = cursor.next_batch()
            log_step = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
            run.engine.timed = log_step or step in traced  # CUDA: spans from device events
            started = time.perf_counter()
            lr = lr_at(step, cfg)
            result = run.engine.train_step(inputs, targets, step, lr, cfg.grad_clip)
            elapsed = time.perf_counter() - started
            history["losses"].append(result["loss"])
            rate_key = f"{family.unit}s_per_s"  # tokens_per_s or samples_per_s
            rate = cfg.batch_size * family.units_per_sample(cfg) / elapsed
            values = {"loss": result["loss"], "lr": lr, "grad_norm": result["grad_norm"],
                      "step_time_s": elapsed, rate_key: rate}
            if cfg.dtype == "float16":  # dynamic loss scaling: a skipped step is worth seeing
                values.update(loss_scale=run.engine.scale.scale, skipped_step=result["skipped"])
            if log_step:  # one small collective brings every stage's bubble and memory to rank 0
                values.update(timeline.pipeline_stats(run.engine, run.layout, spec=run.spec))
                values.update(flops_utilisation(rate, flops_per_unit, run.layout.world_size, device_name,
                                                precision))
            if step in traced:
                timeline.write_trace(run.engine, run.layout, cfg.trace, step + 1, several=len(traced) > 1,
                                     spec=run.spec)
            last_step = step + 1 == last
            if last_step or (cfg.eval_every and (step + 1) % cfg.eval_every == 0):
                values["val_loss"] = validation_loss(run)
                history["val_losses"].append((step, values["val_loss"]))
            logger.log(step + 1, values)  # one record per step; users count steps from 1
            if checkpoints.after_step(step, lr, last_step):  # a SIGTERM: saved at this step boundary, stop
                break
        if cfg.sample and not checkpoints.stopped:  # the config allows --sample for a language model only
            history["sample"] = sample_text(run)
            if rank == 0:
                print(f"--- sample ({cfg.sample} tokens) ---\n{history['sample']}\n---", flush=True)
    finally:  # restore the SIGTERM handler and flush the logs even when a step raised
        checkpoints.close()
        logger.close()
    return history


def last_step_of_run(cfg: Config, first_step: int) -> int:
    """Where this run stops: --steps, or sooner when $MINIPIPE_STEP_LIMIT caps the steps one run
    trains (a quick check of a long command as written: the run validates, saves and samples at
    its last step as at --steps, and the learning-rate schedule is still that of --steps)."""
    limit = os.environ.get(STEP_LIMIT_ENV)
    if not limit:
        return cfg.steps
    if not limit.isdigit() or int(limit) < 1:
        raise ConfigError(f"{STEP_LIMIT_ENV}={limit!r}: give a number of steps >= 1, or unset it")
    return min(cfg.steps, first_step + int(limit))


def sample_text(run) -> str:
    cfg = run.cfg
    prompt, _ = run.dataset.batch(0, 1, split="val")
    prompt = prompt[:, : min(32, cfg.seq_len // 2)]
    new = run.engine.generate(prompt, cfg.sample, cfg.max_seq_len, seed=cfg.seed)
    return decode(torch.cat([prompt[0], new]).tolist(), cfg.vocab)


def main(argv=None) -> int:
    try:
        cfg = parse_config(argv)
        train(cfg)
    except MinipipeError as err:
        # Before the process group starts, the launcher's RANK says which process this is.
        # (As text: a malformed one is what the error may be about.)
        rank = dist.get_rank() if dist.is_initialized() else os.environ.get("RANK", "0")[:20]
        world = dist.get_world_size() if dist.is_initialized() else os.environ.get("WORLD_SIZE", "1")
        where = f"(rank {rank}) " if str(world).strip() not in ("", "0", "1") else ""
        print(f"minipipe error: {where}{err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C, or one without --ckpt-dir: stop, no traceback
        print("minipipe: interrupted (nothing saved since the last checkpoint)", file=sys.stderr,
              flush=True)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
