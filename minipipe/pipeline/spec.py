"""The pipeline's facts, settled once from the Config: what the engine, evaluation, generation, the
timeline, warm-up and the planner need to know about how a step runs, in one small frozen value
handed to each of them by keyword (none of them reads these back off the engine or the Config).

    spec = pipeline_spec(cfg, n_stages)    # the schedule checked against K, M, V here
"""
from dataclasses import dataclass

import torch

from minipipe.schedule.actions import check_schedule

# --dtype -> the parameters' dtype and the autocast dtype (bf16/fp16: fp32 weights under autocast)
PARAM_DTYPES = {"float32": torch.float32, "float64": torch.float64,
                "bfloat16": torch.float32, "float16": torch.float32}
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class PipelineSpec:
    schedule: str  # gpipe | 1f1b | interleaved (minipipe.schedule.actions)
    n_stages: int  # K
    n_microbatches: int  # M, per replica and step
    virtual_stages: int  # V, model chunks per stage
    recompute: str  # always | except_last | never (minipipe.pipeline.recompute)
    microbatch_rows: int  # samples in one micro-batch of one replica: batch size / dp / M
    param_dtype: torch.dtype  # of the parameters, and of floating inputs
    autocast_dtype: torch.dtype | None  # None: no autocast
    timeout_s: float  # how long any wait on another rank may take
    deferred_bn: bool  # BatchNorm statistics over the whole mini-batch, committed after the drain

    @property
    def n_chunks(self) -> int:
        """Model chunks K*V; chunk c runs on stage c mod K."""
        return self.n_stages * self.virtual_stages


def pipeline_spec(cfg, n_stages: int) -> PipelineSpec:
    """The spec of a settled Config on n_stages stages; refuses an impossible (schedule, K, M, V)
    with a ScheduleError before any rank waits."""
    check_schedule(cfg.schedule, n_stages, cfg.microbatches, cfg.virtual_stages)
    return PipelineSpec(schedule=cfg.schedule, n_stages=n_stages, n_microbatches=cfg.microbatches,
                        virtual_stages=cfg.virtual_stages, recompute=cfg.recompute,
                        microbatch_rows=cfg.batch_size // cfg.dp // cfg.microbatches,
                        param_dtype=PARAM_DTYPES[cfg.dtype], autocast_dtype=AUTOCAST_DTYPES.get(cfg.dtype),
                        timeout_s=cfg.timeout, deferred_bn=cfg.deferred_bn)
