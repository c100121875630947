"""PURE: zero-bubble compute orders (Qi et al. 2024, "Zero Bubble Pipeline Parallelism").

The backward of each (chunk, micro-batch) is split in two: I, the input gradient, which the
previous stage waits for, and W, the weight gradients, which nobody waits for and which can fill
the bubble. (The paper calls I "B"; minipipe keeps B for the fused backward, as torch's CSV
format does.) Orders are (letter, chunk, micro-batch) with letters F, I, W; actions.py turns
them into Actions and adds the messages.

    zb-h1   one chunk per rank (ZB-H1, the paper's section 3.1 and its Figure 3): 1F1B's order
            of forwards and input gradients (K-1-r warm-up forwards on rank r), and the W of
            micro-batch j right after the I of micro-batch j + r, the rest at the end. Rank r
            thus delays each W by r micro-batches: its I's reach rank r-1 without waiting for a
            W, and the W's it has saved fill the cool-down. At most K micro-batches are between
            their F and their W on any rank (1F1B's peak, which rank 0 has); with F = I = W each
            rank idles K-1 units per step instead of 1F1B's 3(K-1): the paper's (K-1)(F+B-W).
    zbv     two chunks per rank in a V (ZB-V, the paper's section 6): rank r holds model chunks r
            (local chunk 0, the way down) and 2K-1-r (local chunk 1, the way back up), so the
            first and the last chunk share rank 0 and chunks K-1, K share rank K-1. Warm-up:
            2(K-r)-1 forwards of chunk 0, then r pairs F1 F0, then K-r triples F1 I1 W1; steady
            state F0 I0 W0 F1 I1 W1; cool-down r pairs I0 I1, K-r pairs I0 W0, the W's left.
            Idle-free when F = I = W, at 1F1B's activation memory.
    dualpipev  DeepSeek's DualPipe cut in a V on K ranks (deepseek-ai/DualPipe, "DualPipeV"): the
            same V placement; its steady state pairs a forward of one chunk with the fused
            backward (B) of the other (F0 B1, F1 B0), which DualPipe overlaps with the pair's
            communication; W's fill only the ramp and the tail. Needs M >= 2K.

Each is built by numbering actions in turn per (letter, chunk): the k-th F0 is micro-batch k.
torch.distributed.pipelining's ScheduleZBVZeroBubble and ScheduleDualPipeV compute the same
orders (tests/test_zero_bubble_orders.py compares them, an overlapped F&B pair as F then B).
"""
from collections import Counter, deque


def zb_h1_order(rank: int, n_stages: int, n_microbatches: int, virtual_stages: int = 1) -> list[tuple]:
    k, m = n_stages, n_microbatches
    warmup = min(k - 1 - rank, m)
    order = [("F", 0, i) for i in range(warmup)]
    for i in range(m - warmup):
        order += [("F", 0, warmup + i), ("I", 0, i)]
    order += [("I", 0, i) for i in range(m - warmup, m)]
    with_weights, lag = [], rank
    for step in order:
        with_weights.append(step)
        if step[0] == "I" and step[2] >= lag:
            with_weights.append(("W", 0, step[2] - lag))
    return with_weights + [("W", 0, i) for i in range(max(m - lag, 0), m)]


class _Numbered:
    """An order under construction: each (letter, chunk) stream numbers its micro-batches in
    turn; W's are queued by their I's (oldest first) where a schedule takes them from a queue."""

    def __init__(self):
        self.order, self.count, self.weights_due = [], Counter(), deque()

    def add(self, letter: str, chunk: int) -> None:
        stream = "I" if letter == "B" else letter  # a fused backward counts as its I and its W
        m = self.count[stream, chunk]
        self.order.append((letter, chunk, m))
        self.count[stream, chunk] += 1
        if letter == "B":
            self.count["W", chunk] += 1
        elif letter == "I":
            self.weights_due.append((chunk, m))
        elif letter == "W":
            self.weights_due.remove((chunk, m))

    def add_due_weight(self) -> None:
        """The W of the oldest I still without one (nothing if none)."""
        if self.weights_due:
            chunk, m = self.weights_due.popleft()
            self.order.append(("W", chunk, m))
            self.count["W", chunk] += 1


def zbv_order(rank: int, n_stages: int, n_microbatches: int) -> list[tuple]:
    k, r = n_stages, rank
    # the order for at least 2K-1 micro-batches, whose steady state is reached on every rank;
    # fewer micro-batches keep its order with the missing ones left out
    n = max(n_microbatches, 2 * k - 1)
    o = _Numbered()
    for _ in range(2 * (k - r) - 1):
        o.add("F", 0)
    for _ in range(r):
        o.add("F", 1)
        o.add("F", 0)
    for _ in range(k - r):
        for letter in "FIW":
            o.add(letter, 1)
    while o.count["F", 1] < o.count["F", 0] or o.count["F", 0] < n:
        if o.count["F", 0] < n:
            o.add("F", 0)
        for letter, chunk in (("I", 0), ("W", 0), ("F", 1), ("I", 1), ("W", 1)):
            o.add(letter, chunk)
    for _ in range(r):
        o.add("I", 0)
        o.add("I", 1)
    for _ in range(k - r):
        o.add("I", 0)
        o.add("W", 0)
    for chunk in (1, 0):
        while o.count["W", chunk] < o.count["I", chunk]:
            o.add("W", chunk)
    return [step for step in o.order if step[2] < n_microbatches]


def dualpipev_order(rank: int, n_stages: int, n_microbatches: int) -> list[tuple]:
    k, r, m = n_stages, rank, n_microbatches
    o = _Numbered()
    for _ in range(2 * (k - r - 1)):  # chunk 0's warm-up
        o.add("F", 0)
    for _ in range(r + 1):
        o.add("F", 0)
        o.add("F", 1)
    for _ in range(k - r - 1):  # the first backwards of chunk 1, split: their W's fill the ramp
        o.add("I", 1)
        o.add_due_weight()
        o.add("F", 1)
    for _ in range(m - 2 * k + r + 1):  # steady state: F0 B1, F1 B0 (DualPipe's overlapped pairs)
        for letter, chunk in (("F", 0), ("B", 1), ("F", 1), ("B", 0)):
            o.add(letter, chunk)
    for _ in range(k - r - 1):
        for letter, chunk in (("B", 1), ("F", 1), ("B", 0)):
            o.add(letter, chunk)
    # the tail: from the middle of these r+1 pairs on (chunk 1's half first on odd ranks), the
    # backwards split so their W's can fill the drain
    split, middle = False, (r + 1) // 2
    for i in range(r + 1):
        split = split or (i == middle and r % 2 == 1)
        o.add("I" if split else "B", 1)
        split = split or i == middle
        o.add("I" if split else "B", 0)
    for _ in range(k - r - 1):
        o.add_due_weight()
        o.add("I" if split else "B", 0)
    for _ in range(r + 1):
        o.add_due_weight()
    return o.order
