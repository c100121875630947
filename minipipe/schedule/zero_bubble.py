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
            rank idles K-1 units per step instead of 1F1B's 3(K-1), the paper's (K-1)(F+B-2W).
"""


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
