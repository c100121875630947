"""The pipeline timeline: where each stage's time went in one step, merged over all ranks.

Source: `Engine.spans`, one (kind, micro-batch, chunk, start, end) per executed schedule action
(chunk: the rank's local chunk, as its actions name it, when it holds several, else None), plus two nested kinds: `recompute`
(inside `backward`, or `backward_input` when the backward is split into I and W) and
`norm_allreduce` (inside `step`). Any schedule draws the same way.

Common clock. Each process has its own clock, but every rank leaves the step's gradient-norm
all-reduce at (nearly) the same instant (`Engine.sync_point`), so each rank's spans are taken
relative to that moment; the error is the latency of one small collective (well under a
millisecond on one host). No extra barrier is needed.

Measured bubble (the definition behind GPipe's (K-1)/(M+K-1)): the compute window of a step runs
from the first forward on any stage to the end of the last backward on any stage; a stage's
bubble is the share of that window in which it is not computing (forward, backward, I or W,
recompute included). Waiting on communication counts as bubble. The reported value is the mean
over stages; for equal forward and backward ticks it equals the schedule's formula exactly
((K-1)/(M+K-1) for gpipe and 1f1b, (K-1)/(V*M+K-1) interleaved; the zero-bubble schedules' at
F = I = W: minipipe.schedule.check.theory_bubble).
"""
import json
import os
import resource
from pathlib import Path

import torch
import torch.distributed as dist

from minipipe.pipeline.collectives import collective, to_rank0
from minipipe.pipeline.spec import PipelineSpec
from minipipe.schedule.check import ideal_bubble, theory_bubble

COMPUTE_KINDS = ("forward", "backward", "backward_input", "backward_weight")
LABELS = {"forward": "forward", "recompute": "recompute", "backward": "backward",
          "backward_input": "input grad (I)", "backward_weight": "weight grad (W)",
          "send_act": "send", "send_grad": "send", "recv_act": "recv", "recv_grad": "recv",
          # the step's end waits for this rank's last sends, then any gradient all-reduce (dp,
          # tied embedding, BatchNorm statistics): with dp=1 mostly the sends
          "allreduce": "sends + grad sync", "norm_allreduce": "all-reduce (norm)", "step": "optimizer"}
COLOURS = {"forward": "#4c72b0", "recompute": "#ccb974", "backward": "#dd8452",
           "input grad (I)": "#e8a06a", "weight grad (W)": "#8c564b", "send": "#55a868",
           "recv": "#8172b2", "sends + grad sync": "#c44e52", "all-reduce (norm)": "#da8bc3",
           "optimizer": "#937860"}
NESTED_KINDS = ("recompute", "norm_allreduce")  # drawn on top of the action that contains them


def aligned_spans(engine) -> list[tuple]:
    """This rank's spans of the last step, in seconds since the common clock point."""
    return [(kind, m, chunk, start - engine.sync_point, end - engine.sync_point)
            for kind, m, chunk, start, end in engine.spans]


def _name(label: str, m, chunk) -> str:
    if m is None:
        return label
    return f"{label} {m}" if chunk is None else f"{label} {m}c{chunk}"


# ---- per log interval: the measured bubble and peak memory, one collective ------------------
def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: peak allocated since the last call (then reset). CPU: the process's peak resident
    set size (Linux reports KiB; it never resets)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _compute_extent(spans) -> tuple[float, float, float]:
    """(first compute start, last compute end, busy seconds) of one rank's aligned spans."""
    compute = [(start, end) for kind, _, _, start, end in spans if kind in COMPUTE_KINDS]
    return (min(s for s, _ in compute), max(e for _, e in compute),
            sum(e - s for s, e in compute))


def measured_bubble(extents) -> float:
    """Mean over stages of the idle share of the common compute window (see the module doc)."""
    window_start = min(first for first, _, _ in extents)
    window = max(last for _, last, _ in extents) - window_start
    if window <= 0:
        return 0.0
    return sum(1.0 - busy / window for _, _, busy in extents) / len(extents)


def pipeline_stats(engine, layout, *, spec: PipelineSpec) -> dict:
    """Measured bubble of the last step and each stage's peak memory, on rank 0 (every rank must
    call: one all-gather of 4 numbers per rank). Keys: bubble_measured, bubble_theory,
    peak_mem_gib/stage{s} (the max over dp replicas)."""
    own = [*_compute_extent(aligned_spans(engine)), peak_memory_bytes(layout.device)]
    local = torch.tensor(own, dtype=torch.float64, device=layout.device)
    if layout.world_size > 1:
        gathered = [torch.empty_like(local) for _ in range(layout.world_size)]
        collective(layout, "every stage's bubble and peak memory",
                   lambda: dist.all_gather(gathered, local))
    else:
        gathered = [local]
    rows = [row.tolist() for row in gathered]  # by rank = dp_rank * n_stages + stage
    stats = {"bubble_measured": measured_bubble([row[:3] for row in rows]),
             "bubble_theory": theory_bubble(spec.schedule, spec.n_stages, spec.n_microbatches,
                                            spec.virtual_stages)}
    for stage in range(layout.n_stages):
        peak = max(rows[rank][3] for rank in range(stage, layout.world_size, layout.n_stages))
        stats[f"peak_mem_gib/stage{stage}"] = peak / 2**30
    return stats


# ---- traced steps: every rank's spans to rank 0, written as Chrome trace JSON and a PNG -------
def gather_timeline(engine, layout) -> list[list[tuple]] | None:
    """Every rank's aligned spans of the last step, by rank, on rank 0 (None elsewhere)."""
    return to_rank0(layout, aligned_spans(engine), "every rank's spans of the traced step")


def trace_paths(path: str, step: int, several: bool) -> tuple[Path, Path]:
    """(JSON, PNG) paths for a traced step: PATH and PATH.png, with -step{N} when several."""
    json_path = Path(path)
    if several:
        json_path = json_path.with_name(f"{json_path.stem}-step{step}{json_path.suffix or '.json'}")
    return json_path, json_path.with_suffix(".png")


def chrome_trace(timeline, n_stages: int, step: int) -> dict:
    """Chrome trace events (open in ui.perfetto.dev): pid = dp replica, tid = stage, one complete
    ('X') event per span, times in microseconds from the start of the step's first span."""
    origin = min(start for spans in timeline for _, _, _, start, _ in spans)
    events = []
    for rank, spans in enumerate(timeline):
        replica, stage = divmod(rank, n_stages)
        events.append({"ph": "M", "name": "process_name", "pid": replica, "tid": 0,
                       "args": {"name": f"pipeline replica {replica}"}})
        events.append({"ph": "M", "name": "thread_name", "pid": replica, "tid": stage,
                       "args": {"name": f"stage {stage} (rank {rank})"}})
        events.append({"ph": "M", "name": "thread_sort_index", "pid": replica, "tid": stage,
                       "args": {"sort_index": stage}})
        for kind, m, chunk, start, end in spans:
            events.append({"ph": "X", "name": _name(LABELS[kind], m, chunk), "cat": kind,
                           "pid": replica, "tid": stage, "ts": (start - origin) * 1e6,
                           "dur": (end - start) * 1e6,
                           "args": {"microbatch": m, "chunk": chunk, "step": step}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def draw_gantt(timeline, n_stages: int, n_microbatches: int, step: int, path: Path,
               schedule: str = "gpipe", virtual_stages: int = 1) -> None:
    """GPipe Figure 2 from measured spans: one row per stage (replica 0), a colour per action,
    micro-batch numbers in the compute boxes (`3c1`: micro-batch 3 on the rank's chunk 1, whose
    boxes are hatched), and the measured vs theoretical bubble."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = timeline[:n_stages]
    extents = [_compute_extent(spans) for spans in stages]
    # From the first forward: a stage that entered the step early only waits before it.
    origin = min(first for first, _, _ in extents)
    span_s = max(end for spans in stages for *_, end in spans) - origin
    bubble = measured_bubble(extents)
    fig, ax = plt.subplots(figsize=(12, 0.6 * n_stages + 1.6))
    for stage, spans in enumerate(stages):
        row = n_stages - 1 - stage  # stage 0 on top, as in the paper
        for kind, m, chunk, start, end in sorted(spans, key=lambda s: s[0] in NESTED_KINDS):
            nested = kind in NESTED_KINDS
            height, y = (0.35, row - 0.4) if nested else (0.8, row - 0.4)  # nested: lower half
            start = max(start, origin)
            left, width = (start - origin) * 1e3, max(end - start, 0.0) * 1e3
            ax.broken_barh([(left, width)], (y, height), facecolors=COLOURS[LABELS[kind]],
                           edgecolor="black", linewidth=0.3, hatch="//" if chunk else None)
            if kind in COMPUTE_KINDS and m is not None:
                ax.text(left + width / 2, row + 0.17, _name("", m, chunk).strip(), ha="center",
                        va="center", fontsize=7)
    ax.set_yticks(range(n_stages), [f"stage {s}" for s in reversed(range(n_stages))])
    ax.set_xlim(0, span_s * 1e3 * 1.01)
    ax.set_xlabel("time in the step (ms)")
    ax.set_title(f"step {step}: {schedule}, K={n_stages}, M={n_microbatches}, V={virtual_stages}; bubble "
                 f"measured {bubble:.3f}, theory {ideal_bubble(schedule, n_stages, n_microbatches, virtual_stages)}")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLOURS.values()]
    fig.legend(handles, COLOURS.keys(), loc="lower center", ncol=len(COLOURS), fontsize=7,
               frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_trace(engine, layout, path: str, step: int, several: bool, *, spec: PipelineSpec) -> Path | None:
    """Collective: gather the last step's spans; rank 0 writes the JSON and PNG and prints the
    bubble. Returns the JSON path on rank 0."""
    timeline = gather_timeline(engine, layout)
    if layout.rank != 0:
        return None
    json_path, png_path = trace_paths(path, step, several)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = json_path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(chrome_trace(timeline, layout.n_stages, step)))
    os.replace(tmp, json_path)
    v = spec.virtual_stages
    draw_gantt(timeline, spec.n_stages, spec.n_microbatches, step, png_path, spec.schedule, v)
    bubble = measured_bubble([_compute_extent(spans) for spans in timeline])
    print(f"trace of step {step}: {json_path} (ui.perfetto.dev), {png_path}; bubble measured "
          f"{bubble:.3f} vs {ideal_bubble(spec.schedule, spec.n_stages, spec.n_microbatches, v)}",
          flush=True)
    return json_path
