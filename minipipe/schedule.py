"""PURE: (stage, K, M) -> the ordered actions of one GPipe training step; a text grid of all stages.

GPipe fill-drain (Huang et al. 2019, Figure 2). For stage s of K and micro-batches 0..M-1:

    for m in 0..M-1:    [recv_act(m) if s > 0]    forward(m)   [send_act(m) if s < K-1]
    for m in M-1..0:    [recv_grad(m) if s < K-1] backward(m)  [send_grad(m) if s > 0]
    allreduce, step

Invariant the engine and the deadlock test rely on: the k-th `send_act` of stage s and the k-th
`recv_act` of stage s+1 name the same micro-batch (both ascend), and likewise the k-th `send_grad`
of stage s+1 and the k-th `recv_grad` of stage s (both descend). `backward(m)` includes the
re-materialising forward recompute of micro-batch m. No torch.distributed in here.
"""
import argparse
import sys
from dataclasses import dataclass

ACTION_KINDS = ("recv_act", "forward", "send_act", "recv_grad", "backward", "send_grad",
                "allreduce", "step")
_SHORT = {"forward": "F", "backward": "B"}
BUBBLE = "."


@dataclass(frozen=True)
class Action:
    kind: str  # one of ACTION_KINDS
    microbatch: int | None = None  # None for 'allreduce' and 'step'

    def __post_init__(self):
        if self.kind not in ACTION_KINDS:
            raise ValueError(f"unknown action kind {self.kind!r}; expected one of {ACTION_KINDS}")
        if (self.microbatch is None) != (self.kind in ("allreduce", "step")):
            raise ValueError(f"action {self.kind!r} got microbatch={self.microbatch!r}")

    def __str__(self):
        if self.microbatch is None:
            return self.kind
        return f"{_SHORT.get(self.kind, self.kind)}{self.microbatch}"


def _check(stage: int, n_stages: int, n_microbatches: int) -> None:
    if n_stages < 1 or n_microbatches < 1:
        raise ValueError(f"need n_stages >= 1 and n_microbatches >= 1, got K={n_stages}, M={n_microbatches}")
    if not 0 <= stage < n_stages:
        raise ValueError(f"stage {stage} is outside 0..{n_stages - 1}")


def forward_actions(stage: int, n_stages: int, n_microbatches: int) -> list[Action]:
    """The fill half: every micro-batch forward in ascending order (also used alone for evaluation)."""
    _check(stage, n_stages, n_microbatches)
    actions = []
    for m in range(n_microbatches):
        if stage > 0:
            actions.append(Action("recv_act", m))
        actions.append(Action("forward", m))
        if stage < n_stages - 1:
            actions.append(Action("send_act", m))
    return actions


def gpipe_actions(stage: int, n_stages: int, n_microbatches: int) -> list[Action]:
    """One training step of stage `stage`: forwards, backwards in reverse order, all-reduce, step."""
    actions = forward_actions(stage, n_stages, n_microbatches)
    for m in reversed(range(n_microbatches)):
        if stage < n_stages - 1:
            actions.append(Action("recv_grad", m))
        actions.append(Action("backward", m))
        if stage > 0:
            actions.append(Action("send_grad", m))
    actions += [Action("allreduce"), Action("step")]
    return actions


def bubble_fraction(n_stages: int, n_microbatches: int) -> float:
    """Idle share of each stage's F/B clock ticks: (K-1) / (M+K-1) (GPipe section 2.2)."""
    _check(0, n_stages, n_microbatches)
    return (n_stages - 1) / (n_microbatches + n_stages - 1)


def render_grid(n_stages: int, n_microbatches: int) -> str:
    """The K x time grid of GPipe's Figure 2: one row per stage, one column per clock tick.

    Forward of micro-batch m on stage s runs at clock s + m; its backward at
    (M+K-1) + (K-1-s) + (M-1-m). Idle cells are the bubble.
    """
    _check(0, n_stages, n_microbatches)
    k, m_count = n_stages, n_microbatches
    n_clocks = 2 * (m_count + k - 1)
    cells = [[BUBBLE] * n_clocks for _ in range(k)]
    for s in range(k):
        for m in range(m_count):
            cells[s][s + m] = f"F{m}"
            cells[s][(m_count + k - 1) + (k - 1 - s) + (m_count - 1 - m)] = f"B{m}"
    width = max(len(f"B{m_count - 1}"), len(str(n_clocks - 1)))
    label = len(f"stage {k - 1}")
    lines = [" " * label + " | " + " ".join(str(t).rjust(width) for t in range(n_clocks))]
    lines.append("-" * len(lines[0]))
    for s in range(k):
        row = " ".join(c.rjust(width) for c in cells[s])
        lines.append(f"stage {s}".ljust(label) + " | " + row)
    lines.append(f"bubble fraction (K-1)/(M+K-1) = {k - 1}/{m_count + k - 1} = "
                 f"{bubble_fraction(k, m_count):.3f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Print the GPipe fill-drain schedule as a grid.")
    parser.add_argument("--stages", type=int, default=4, help="pipeline stages K")
    parser.add_argument("--microbatches", type=int, default=8, help="micro-batches M")
    args = parser.parse_args(argv)
    if args.stages < 1 or args.microbatches < 1:
        parser.error(f"--stages and --microbatches must be >= 1 (got {args.stages}, {args.microbatches})")
    print(render_grid(args.stages, args.microbatches))


if __name__ == "__main__":
    main(sys.argv[1:])
