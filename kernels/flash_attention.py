"""Flash attention (FlashAttention-2 schedule): the T x T score matrix is never stored.

Forward: one program per (query block, batch*head) streams key/value blocks with an online
softmax and keeps the row logsumexp (log2 units) for the backward. Backward: delta = rowsum(dO*O),
then one kernel per key block accumulates dK, dV and one per query block accumulates dQ, so no
atomics are needed and results are deterministic. Causal programs visit only blocks on or below the
diagonal and pay for the mask only on the diagonal blocks. Tails (T not a multiple of a block) are
masked on load; rows past T are never stored.

Grouped-query attention: k and v may have fewer heads than q (H a multiple of H_kv). Query head h
reads key/value head h // (H / H_kv) through its pointer, so K and V are never repeated in
memory; the dK/dV program of a key/value head sums over the query heads of its group.

On a GPU the dots take fp16/bf16 operands with fp32 accumulation; in the interpreter operands are
upcast to fp32 first (bf16 arithmetic is wrong there)."""
import math

import torch

from minipipe.kernels.runtime import INTERPRETING, autotune_configs, empty, tf32_allowed, tl, triton

HEAD_DIMS = (16, 32, 64, 128)
LOG2_E = 1.4426950408889634


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per operand size in bytes, with BLOCK_N dividing
# BLOCK_M so the diagonal is covered by whole inner blocks. fp32 operands take twice the shared
# memory per element, and their (3x)TF32 dots keep hi/lo halves live: they get small blocks on
# 4 warps (8 warps did not lower their registers per thread). `_fits` then drops, per head dim,
# the configs that would spill or overflow shared memory; bench/compile_report.py checks the rest.
# Removed after the full report: 16-bit fwd (128, 64, 8, 3) and bwd (128, 64, 8, 3), (64, 64, 4, 3)
# spill on sm_80 at some head dims; fp32 bwd (32, 16, 4, 2) spills on sm_90 at D=32.
_FWD_CANDIDATES = {2: [(128, 128, 8, 3), (128, 64, 4, 4), (64, 64, 4, 3), (128, 32, 4, 4),
                       (64, 32, 4, 4)],
                   4: [(64, 32, 4, 2), (32, 32, 4, 1), (32, 16, 4, 2), (16, 16, 4, 2)]}
# Backward: BLOCK_M is the block the program owns, BLOCK_N the block it streams.
# (64, 32, 8, 3): the grouped-query dK/dV program (a loop over the group) spills with 4 warps at
# D=128 on sm_80 and sm_90; 8 warps halve each thread's share of the accumulators.
_BWD_CANDIDATES = {2: [(128, 32, 8, 3), (64, 32, 4, 3), (128, 32, 4, 5), (64, 32, 8, 3)],
                   4: [(64, 32, 4, 2), (16, 16, 4, 2)]}
# Register words per thread a config may plan for (ptxas needs the rest of the 255 for addresses
# and temporaries), and the smallest per-block shared memory of the targets (A100's).
_REGISTER_BUDGET = {2: 160, 4: 80}  # fp32's calibrated on sm_90 at D=128 (compile report)
_SHARED_BUDGET = 166_912


def _fits(config, element_size, head_dim, backward):
    """Estimated per-thread registers (fp32 accumulators, score blocks, owned operands) and shared
    memory (streamed operands per pipeline stage, plus owned operands) within the budgets."""
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    threads = 32 * config.num_warps
    words = element_size / 4
    accumulators = 2 if backward else 1  # dK and dV (dQ alone estimates lower: it fits when these do)
    registers = (accumulators * block_m * head_dim * (1 + words) + 2 * block_m * block_n) / threads
    shared = (config.num_stages * block_n + block_m) * head_dim * element_size * 2
    return registers <= _REGISTER_BUDGET[element_size] and shared <= _SHARED_BUDGET


def _prune(backward):
    def prune(configs, named_args, **kwargs):
        """The configs of q's operand size that fit its head dim (at least the smallest)."""
        element_size = named_args["q_ptr"].element_size()
        own = [c for c in configs if c.kwargs["SIZE"] == element_size]
        fitting = [c for c in own if _fits(c, element_size, kwargs["HEAD_DIM"], backward)]
        return fitting or [min(own, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    return {"early_config_prune": prune}


def _configs(candidates):
    names = ("BLOCK_M", "BLOCK_N")
    # SIZE tags a config with the operand size it was chosen for; the kernels ignore it.
    return autotune_configs(
        [triton.Config({**dict(zip(names, (a, b))), "SIZE": size}, num_warps=w, num_stages=s)
         for size, quads in candidates.items() for a, b, w, s in quads],
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "SIZE": 0}))


_FWD_CONFIGS = _configs(_FWD_CANDIDATES)
_BWD_CONFIGS = _configs(_BWD_CANDIDATES)
_TUNING_KEY = ["T_BUCKET", "HEAD_DIM", "CAUSAL"]


def tuning_bucket(T: int) -> int:
    """What the autotuner keys on instead of T: the next power of two (at least 16, so the value
    never specialises differently). Text generation grows T by one per token; keyed on T itself,
    every new length would benchmark every config again."""
    return max(16, triton.next_power_of_2(T))


@triton.jit
def _load_rows(base_ptr, offs, T, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """A [len(offs), HEAD_DIM] block of a contiguous (T, HEAD_DIM) matrix; rows >= T read zero."""
    dims = tl.arange(0, HEAD_DIM)
    block = tl.load(base_ptr + offs[:, None] * HEAD_DIM + dims[None, :], mask=offs[:, None] < T,
                    other=0.0)
    return block.to(tl.float32) if UPCAST else block


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, offs_m, lo, hi, T, qk_scale,
               MASK_CAUSAL: tl.constexpr, MASK_TAIL: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, T, HEAD_DIM, UPCAST)
        v = _load_rows(v_base, offs_n, T, HEAD_DIM, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASK_CAUSAL:
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        if MASK_TAIL:
            s = tl.where(offs_n[None, :] < T, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNING_KEY, prune_configs_by=_prune(backward=False))
@triton.jit
def _attn_fwd(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, T, T_BUCKET, GROUP, qk_scale, HEAD_DIM: tl.constexpr,
              CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SIZE: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    start_m = tl.program_id(1) * BLOCK_M
    base = bh * T * HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_rows(q_ptr + base, offs_m, T, HEAD_DIM, UPCAST)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    kv_base = (bh // GROUP) * T * HEAD_DIM  # query head h reads key/value head h // GROUP
    k_base, v_base = k_ptr + kv_base, v_ptr + kv_base
    if CAUSAL:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, offs_m, 0, start_m, T,
                                   qk_scale, False, False, HEAD_DIM, BLOCK_N, UPCAST, PRECISION)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, offs_m, start_m,
                                   tl.minimum(start_m + BLOCK_M, T), T, qk_scale, True, False,
                                   HEAD_DIM, BLOCK_N, UPCAST, PRECISION)
    else:
        full = (T // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, offs_m, 0, full, T,
                                   qk_scale, False, False, HEAD_DIM, BLOCK_N, UPCAST, PRECISION)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, offs_m, full, T, T,
                                   qk_scale, False, True, HEAD_DIM, BLOCK_N, UPCAST, PRECISION)
    row_mask = offs_m < T
    dims = tl.arange(0, HEAD_DIM)
    out = acc / l_i[:, None]
    tl.store(o_ptr + base + offs_m[:, None] * HEAD_DIM + dims[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_mask[:, None])
    tl.store(lse_ptr + bh * T + offs_m, m_i + tl.log2(l_i), mask=row_mask)


@triton.jit
def _attn_bwd_delta(o_ptr, do_ptr, delta_ptr, T, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _load_rows(o_ptr + bh * T * HEAD_DIM, offs_m, T, HEAD_DIM, True)
    do = _load_rows(do_ptr + bh * T * HEAD_DIM, offs_m, T, HEAD_DIM, True)
    tl.store(delta_ptr + bh * T + offs_m, tl.sum(o * do, axis=1), mask=offs_m < T)


@triton.jit
def _bwd_kv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, lo, hi, T,
                  qk_scale, MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # Query rows past T read q = dO = 0 and lse = +inf, so their p is 0 and they add nothing.
    for start_m in range(lo, hi, BLOCK_Q):
        offs_m = start_m + tl.arange(0, BLOCK_Q)
        q = _load_rows(q_base, offs_m, T, HEAD_DIM, UPCAST)
        do = _load_rows(do_base, offs_m, T, HEAD_DIM, UPCAST)
        lse = tl.load(lse_base + offs_m, mask=offs_m < T, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=offs_m < T, other=0.0)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
        if MASK:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.autotune(configs=_BWD_CONFIGS, key=_TUNING_KEY, prune_configs_by=_prune(backward=True))
@triton.jit
def _attn_bwd_dkdv(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, T, T_BUCKET,
                   GROUP, sm_scale, qk_scale, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, SIZE: tl.constexpr):
    # One program per (key/value head, key block): it sums over the GROUP query heads that read
    # this head, so a shared K/V gets its whole gradient without atomics.
    kv_bh = tl.program_id(0).to(tl.int64)
    start_n = tl.program_id(1) * BLOCK_M
    base = kv_bh * T * HEAD_DIM
    offs_n = start_n + tl.arange(0, BLOCK_M)
    k = _load_rows(k_ptr + base, offs_n, T, HEAD_DIM, UPCAST)
    v = _load_rows(v_ptr + base, offs_n, T, HEAD_DIM, UPCAST)
    dk = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for g in range(GROUP):
        bh = kv_bh * GROUP + g
        q_base = bh * T * HEAD_DIM
        args = (q_ptr + q_base, do_ptr + q_base, lse_ptr + bh * T, delta_ptr + bh * T, offs_n)
        if CAUSAL:
            dk, dv = _bwd_kv_inner(dk, dv, k, v, *args, start_n, tl.minimum(start_n + BLOCK_M, T), T,
                                   qk_scale, True, HEAD_DIM, BLOCK_N, UPCAST, PRECISION)
            dk, dv = _bwd_kv_inner(dk, dv, k, v, *args, start_n + BLOCK_M, T, T, qk_scale, False,
                                   HEAD_DIM, BLOCK_N, UPCAST, PRECISION)
        else:
            dk, dv = _bwd_kv_inner(dk, dv, k, v, *args, 0, T, T, qk_scale, False, HEAD_DIM, BLOCK_N,
                                   UPCAST, PRECISION)
    dims = tl.arange(0, HEAD_DIM)
    row_mask = offs_n[:, None] < T
    offsets = base + offs_n[:, None] * HEAD_DIM + dims[None, :]
    tl.store(dk_ptr + offsets, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=row_mask)
    tl.store(dv_ptr + offsets, dv.to(dv_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _bwd_q_inner(dq, q, do, lse, delta, k_base, v_base, offs_m, lo, hi, T, qk_scale,
                 MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_KV: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # Key rows past T read k = v = 0: whatever their p, ds * k adds nothing to dQ.
    for start_n in range(lo, hi, BLOCK_KV):
        offs_n = start_n + tl.arange(0, BLOCK_KV)
        k = _load_rows(k_base, offs_n, T, HEAD_DIM, UPCAST)
        v = _load_rows(v_base, offs_n, T, HEAD_DIM, UPCAST)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
        if MASK:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.autotune(configs=_BWD_CONFIGS, key=_TUNING_KEY, prune_configs_by=_prune(backward=True))
@triton.jit
def _attn_bwd_dq(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, T, T_BUCKET, GROUP, sm_scale,
                 qk_scale, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 SIZE: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    start_m = tl.program_id(1) * BLOCK_M
    base = bh * T * HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_rows(q_ptr + base, offs_m, T, HEAD_DIM, UPCAST)
    do = _load_rows(do_ptr + base, offs_m, T, HEAD_DIM, UPCAST)
    lse = tl.load(lse_ptr + bh * T + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(delta_ptr + bh * T + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    kv_base = (bh // GROUP) * T * HEAD_DIM
    args = (q, do, lse, delta, k_ptr + kv_base, v_ptr + kv_base, offs_m)
    if CAUSAL:
        dq = _bwd_q_inner(dq, *args, 0, start_m, T, qk_scale, False, HEAD_DIM, BLOCK_N, UPCAST,
                          PRECISION)
        dq = _bwd_q_inner(dq, *args, start_m, tl.minimum(start_m + BLOCK_M, T), T, qk_scale, True,
                          HEAD_DIM, BLOCK_N, UPCAST, PRECISION)
    else:
        dq = _bwd_q_inner(dq, *args, 0, T, T, qk_scale, False, HEAD_DIM, BLOCK_N, UPCAST,
                          PRECISION)
    dims = tl.arange(0, HEAD_DIM)
    tl.store(dq_ptr + base + offs_m[:, None] * HEAD_DIM + dims[None, :],
             (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=offs_m[:, None] < T)


def _kernel_flags(q):
    # Every dot runs on tensor cores. fp32 inputs take TF32 where torch allows it for fp32 matmuls
    # (as train.py does on CUDA), else 3xTF32 (hi/lo split, about fp32 accuracy): an exact 'ieee'
    # dot runs on FMA units and holds whole head-dim rows per thread, which spills at D >= 64.
    precise = q.dtype == torch.float32 and not tf32_allowed()
    return dict(HEAD_DIM=q.shape[-1], UPCAST=INTERPRETING, PRECISION="tf32x3" if precise else "tf32")


def _grid(T, BH):
    # (batch*head, query block): CUDA allows 2^31 - 1 blocks on axis 0 but only 65535 on axis 1,
    # and B*H outgrows 65535 long before T / BLOCK_M does.
    return lambda meta: (BH, triton.cdiv(T, meta["BLOCK_M"]))


def _group(q, k, v) -> int:
    """Query heads per key/value head, after checking the shapes: q (B, H, T, D), k and v
    (B, H_kv, T, D) with H a multiple of H_kv."""
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    if not (k.shape == v.shape and k.shape[0] == B and k.shape[2:] == (T, D) and H % H_kv == 0):
        raise ValueError(f"attention kernel needs q (B, H, T, D) and k, v (B, H_kv, T, D) with H a "
                         f"multiple of H_kv, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    return H // H_kv


def attention_forward(q, k, v, causal):
    B, H, T, D = q.shape
    group = _group(q, k, v)
    if D not in HEAD_DIMS:
        raise ValueError(f"attention kernel supports head dims {HEAD_DIMS}, got {D}: use backend 'torch'")
    sm_scale = 1 / math.sqrt(D)
    o = empty(q.shape, q.dtype, q.device)
    lse = empty((B, H, T), torch.float32, q.device)
    _attn_fwd[_grid(T, B * H)](q, k, v, o, lse, T, tuning_bucket(T), group, sm_scale * LOG2_E,
                               CAUSAL=causal, **_kernel_flags(q))
    return o, lse


def attention_backward(do, q, k, v, o, lse, causal):
    B, H, T, D = q.shape
    group = H // k.shape[1]
    sm_scale = 1 / math.sqrt(D)
    delta = empty((B, H, T), torch.float32, q.device)
    _attn_bwd_delta[(B * H, triton.cdiv(T, 64))](o, do, delta, T, HEAD_DIM=D, BLOCK_M=64)
    dq = empty(q.shape, q.dtype, q.device)
    dk, dv = (empty(k.shape, k.dtype, k.device) for _ in range(2))
    flags = dict(CAUSAL=causal, **_kernel_flags(q))
    _attn_bwd_dkdv[_grid(T, B * H // group)](q, k, v, do, lse, delta, dk, dv, T, tuning_bucket(T),
                                             group, sm_scale, sm_scale * LOG2_E, **flags)
    _attn_bwd_dq[_grid(T, B * H)](q, k, v, do, lse, delta, dq, T, tuning_bucket(T), group, sm_scale,
                                  sm_scale * LOG2_E, **flags)
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = attention_forward(q, k, v, causal)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal = causal
        return o

    @staticmethod
    def backward(ctx, do):
        dq, dk, dv = attention_backward(do.contiguous(), *ctx.saved_tensors, ctx.causal)
        return dq, dk, dv, None


def attention_reference(q, k, v, causal):
    """Explicit softmax(q k^T / sqrt(D) + mask) v: an independent reference (not SDPA), exact and
    deterministic in float64; scores in at least fp32. Grouped-query k, v are repeated per query
    head here (the reference may spend the memory)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-2, -1)) * (1 / math.sqrt(q.shape[-1]))
    scores = scores.float() if scores.element_size() < 4 else scores
    if causal:
        T = q.shape[-2]
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1).to(v.dtype) @ v
