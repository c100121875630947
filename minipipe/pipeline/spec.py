"""The pipeline's facts, settled once from the Config: what the engine, evaluation, generation, the
timeline, warm-up and the planner need to know about how a step runs, in one small frozen value
handed to each of them by keyword (none of them reads these back off the engine or the Config).

    spec = pipeline_spec(cfg, n_stages)    # the schedule checked against K, M, V here

The schedule is settled here too: every rank's action list (`actions`, what the engine runs
verbatim) and the placement of the model's chunks on the ranks (`placement`; a --schedule file
names both, and is proven by the checker's simulation here, before any rank waits).
"""
from dataclasses import dataclass

import torch

from minipipe.schedule.actions import Action, chunks_on
from minipipe.schedule.check import schedule_lists

# --dtype -> the parameters' dtype and the autocast dtype (bf16/fp16: fp32 weights under autocast)
PARAM_DTYPES = {"float32": torch.float32, "float64": torch.float64,
                "bfloat16": torch.float32, "float16": torch.float32}
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class PipelineSpec:
    schedule: str  # a name in minipipe.schedule.actions.SCHEDULES, or a CSV file's path
    n_stages: int  # K
    n_microbatches: int  # M, per replica and step
    virtual_stages: int  # V, model chunks per stage
    placement: tuple[int, ...]  # the stage that runs each model chunk (schedule.actions.chunk_placement)
    actions: tuple[tuple[Action, ...], ...]  # each stage's training list of one step
    recompute: str  # always | except_last | never (minipipe.pipeline.recompute)
    microbatch_rows: int  # samples in one micro-batch of one replica: batch size / dp / M
    param_dtype: torch.dtype  # of the parameters, and of floating inputs
    autocast_dtype: torch.dtype | None  # None: no autocast
    timeout_s: float  # how long any wait on another rank may take
    deferred_bn: bool  # BatchNorm statistics over the whole mini-batch, committed after the drain

    @property
    def n_chunks(self) -> int:
        """Model chunks K*V; chunk c runs on stage placement[c]."""
        return len(self.placement)

    def chunks_on(self, stage: int) -> list[int]:
        """The model chunks `stage` runs; its local chunk v is the v-th."""
        return chunks_on(self.placement, stage)

    @property
    def tie_copied(self) -> bool:
        """The first and the last chunk run on two stages: a tied weight is held twice (pipeline/tied.py)."""
        return self.placement[0] != self.placement[-1]


def pipeline_spec(cfg, n_stages: int) -> PipelineSpec:
    """The spec of a settled Config on n_stages stages; refuses an impossible (schedule, K, M, V),
    or a schedule file that cannot run, with a ScheduleError before any rank waits."""
    lists, placement = schedule_lists(cfg.schedule, n_stages, cfg.microbatches, cfg.virtual_stages)
    return PipelineSpec(schedule=cfg.schedule, n_stages=n_stages, n_microbatches=cfg.microbatches,
                        virtual_stages=len(placement) // n_stages, placement=placement,
                        actions=tuple(tuple(lists[s]) for s in range(n_stages)), recompute=cfg.recompute,
                        microbatch_rows=cfg.batch_size // cfg.dp // cfg.microbatches,
                        param_dtype=PARAM_DTYPES[cfg.dtype], autocast_dtype=AUTOCAST_DTYPES.get(cfg.dtype),
                        timeout_s=cfg.timeout, deferred_bn=cfg.deferred_bn)
