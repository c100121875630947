"""Benchmark every Triton kernel against torch eager and torch.compile (and SDPA for attention).

For each op, shape and implementation: median time (triton.testing.do_bench) of forward, backward
and forward+backward, achieved GB/s or TFLOP/s from the op's nominal work, and peak memory above
the inputs. Backward is timed as (forward+backward) - forward, because the cross-entropy kernels
produce their gradient in the forward and scale it in place, so they cannot replay a backward.
Rows go to a CSV tagged with the GPU name and to a markdown table on stdout; rows that carry one of
the issue's H100 targets say whether it was met.

    python bench/kernels.py [--quick] [--csv bench/kernels.csv]
"""
import argparse
import csv
import datetime
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minipipe.kernels import ops  # noqa: E402
from minipipe.kernels.batchnorm import batch_norm_reference  # noqa: E402
from minipipe.kernels.flash_attention import attention_reference  # noqa: E402
from minipipe.kernels.fused_cross_entropy import cross_entropy_reference, linear_cross_entropy_reference  # noqa: E402
from minipipe.kernels.gelu import bias_gelu_reference  # noqa: E402
from minipipe.kernels.layernorm import layer_norm_reference  # noqa: E402
from minipipe.kernels.rmsnorm import rms_norm_reference  # noqa: E402
from minipipe.kernels.rope import rope_reference  # noqa: E402
from minipipe.kernels.swiglu import swiglu_reference  # noqa: E402

FIELDS = ["gpu", "op", "shape", "dtype", "impl", "mode", "ms", "rate", "unit", "peak_mib",
          "target", "achieved", "met"]
MODES = ("fwd", "bwd", "fwd+bwd")
EAGER_ATTENTION_MAX_T = 4096  # the explicit reference stores B*H*T*T scores: beyond this, OOM


def do_bench(fn):
    from triton.testing import do_bench as triton_do_bench
    return triton_do_bench(fn, return_mode="median")


def peak_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure(forward, inputs):
    """{mode: (ms, peak MiB)} for forward(*inputs) and its backward."""
    grad = torch.randn_like(forward(*inputs))

    def fwd():
        forward(*inputs)

    def fwd_bwd():
        forward(*inputs).backward(grad)
        for t in inputs:
            t.grad = None

    fwd_ms, full_ms = do_bench(fwd), do_bench(fwd_bwd)
    fwd_peak, full_peak = peak_mib(fwd), peak_mib(fwd_bwd)
    return {"fwd": (fwd_ms, fwd_peak), "bwd": (full_ms - fwd_ms, full_peak),
            "fwd+bwd": (full_ms, full_peak)}


def leaves(*tensors):
    return [t.requires_grad_() if t.is_floating_point() else t for t in tensors]


def run_op(rows, op, shape, dtype, impls, inputs, work, unit):
    """impls: {name: forward}; work: {mode: nominal bytes or flops}. Returns {(impl, mode): ms}."""
    timings = {}
    for name, forward in impls.items():
        try:
            result = measure(forward, inputs)
        except Exception as error:  # e.g. torch.compile unavailable or out of memory
            print(f"  {op} {shape} {name}: skipped ({type(error).__name__}: {error})"[:200])
            torch.cuda.empty_cache()
            continue
        for mode, (ms, peak) in result.items():
            timings[name, mode] = ms
            rate = work[mode] / (ms * 1e-3) / (1e9 if unit == "GB/s" else 1e12)
            rows.append(dict(op=op, shape=shape, dtype=str(dtype).removeprefix("torch."), impl=name,
                             mode=mode, ms=f"{ms:.4f}", rate=f"{rate:.1f}", unit=unit,
                             peak_mib=f"{peak:.0f}", target="", achieved="", met=""))
    return timings


def set_target(rows, op, shape, impl, mode, target, achieved, threshold):
    for row in rows:
        if (row["op"], row["shape"], row["impl"], row["mode"]) == (op, shape, impl, mode):
            row.update(target=target, achieved=f"{achieved:.2f}", met=str(achieved >= threshold))


def both_compiled(reference):
    return {"torch": reference, "torch.compile": torch.compile(reference)}


def bench_copy(rows):
    """Device copy bandwidth: the ceiling a memory-bound kernel like LayerNorm is judged against."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    gbps = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
    rows.append(dict(op="copy", shape="2^28 fp32", dtype="float32", impl="torch", mode="fwd",
                     ms=f"{ms:.4f}", rate=f"{gbps:.1f}", unit="GB/s", peak_mib="", target="",
                     achieved="", met=""))
    return gbps


def bench_layer_norm(rows, quick, copy_gbps):
    dtype = torch.bfloat16
    for dim in (1024, 4096) if quick else (1024, 2048, 4096, 8192):
        n = 16384
        inputs = leaves(torch.randn(n, dim, device="cuda", dtype=dtype),
                        torch.ones(dim, device="cuda"), torch.zeros(dim, device="cuda"))
        impls = {"triton": lambda x, w, b: ops.layer_norm(x, w, b, 1e-5, "triton"),
                 **both_compiled(lambda x, w, b: layer_norm_reference(x, w, b, 1e-5))}
        size = n * dim * dtype.itemsize
        shape = f"{n}x{dim}"
        timings = run_op(rows, "layer_norm", shape, dtype, impls, inputs,
                         {"fwd": 2 * size, "bwd": 3 * size, "fwd+bwd": 5 * size}, "GB/s")
        if ("triton", "fwd") in timings:
            fraction = 2 * size / (timings["triton", "fwd"] * 1e-3) / 1e9 / copy_gbps
            set_target(rows, "layer_norm", shape, "triton", "fwd", ">=0.8 of copy GB/s", fraction, 0.8)


def bench_rms_norm(rows, quick, copy_gbps):
    """Llama's RMSNorm: the Triton kernel beside F.rms_norm (the --kernels torch path) and the
    written-out reference, eager and compiled."""
    dtype = torch.bfloat16
    for dim in (2048, 4096) if quick else (1024, 2048, 4096, 8192):
        n = 16384
        inputs = leaves(torch.randn(n, dim, device="cuda", dtype=dtype), torch.ones(dim, device="cuda"))
        impls = {"triton": lambda x, w: ops.rms_norm(x, w, 1e-5, "triton"),
                 "F.rms_norm": lambda x, w: ops.rms_norm(x, w, 1e-5, "torch"),
                 **both_compiled(lambda x, w: rms_norm_reference(x, w, 1e-5))}
        size = n * dim * dtype.itemsize
        shape = f"{n}x{dim}"
        timings = run_op(rows, "rms_norm", shape, dtype, impls, inputs,
                         {"fwd": 2 * size, "bwd": 3 * size, "fwd+bwd": 5 * size}, "GB/s")
        if ("triton", "fwd") in timings:
            fraction = 2 * size / (timings["triton", "fwd"] * 1e-3) / 1e9 / copy_gbps
            set_target(rows, "rms_norm", shape, "triton", "fwd", ">=0.8 of copy GB/s", fraction, 0.8)


def bench_rope(rows, quick):
    """RoPE on q and k of a grouped-query layer (both outputs concatenated, in every impl alike,
    so one gradient drives both)."""
    dtype, batch, heads, kv_heads, d = torch.bfloat16, 4, 32, 8, 128
    for t in (2048,) if quick else (1024, 4096):
        angles = torch.randn(t, d // 2, device="cuda").repeat(1, 2)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        inputs = leaves(torch.randn(batch, heads, t, d, device="cuda", dtype=dtype),
                        torch.randn(batch, kv_heads, t, d, device="cuda", dtype=dtype))

        def reference(q, k, cos=cos, sin=sin):
            return torch.cat((rope_reference(q, cos, sin), rope_reference(k, cos, sin)), dim=1)

        def triton(q, k, cos=cos, sin=sin):
            return torch.cat(ops.rotary_embedding(q, k, cos, sin, "triton"), dim=1)
        impls = {"triton": triton, **both_compiled(reference)}
        size = batch * (heads + kv_heads) * t * d * dtype.itemsize
        run_op(rows, "rotary_embedding", f"B{batch} H{heads} Hkv{kv_heads} T{t} d{d}", dtype, impls,
               inputs, {"fwd": 2 * size, "bwd": 2 * size, "fwd+bwd": 4 * size}, "GB/s")


def bench_swiglu(rows, quick):
    dtype = torch.bfloat16
    for n, dim in [(16384, 8192)] if quick else [(16384, 4096), (16384, 14336)]:
        inputs = leaves(*(torch.randn(n, dim, device="cuda", dtype=dtype) for _ in range(2)))
        impls = {"triton": lambda g, u: ops.silu_and_mul(g, u, "triton"), **both_compiled(swiglu_reference)}
        size = n * dim * dtype.itemsize
        run_op(rows, "silu_and_mul", f"{n}x{dim}", dtype, impls, inputs,
               {"fwd": 3 * size, "bwd": 5 * size, "fwd+bwd": 8 * size}, "GB/s")


def bench_grouped_query_attention(rows, quick):
    """4 query heads per key/value head: the kernel reads the shared heads in place; SDPA flash
    with enable_gqa does too; the eager reference repeats them."""
    dtype, batch, heads, kv_heads, d = torch.bfloat16, 4, 32, 8, 128
    for t in (2048,) if quick else (2048, 8192):
        inputs = leaves(torch.randn(batch, heads, t, d, device="cuda", dtype=dtype),
                        *(torch.randn(batch, kv_heads, t, d, device="cuda", dtype=dtype) for _ in range(2)))
        impls = {"triton": lambda q, k, v: ops.attention(q, k, v, True, "triton"),
                 "sdpa flash": sdpa_flash}
        if t <= EAGER_ATTENTION_MAX_T:
            impls["torch"] = lambda q, k, v: attention_reference(q, k, v, True)
        flops = 4 * batch * heads * t * t * d * 0.5
        run_op(rows, "attention gqa", f"B{batch} H{heads} Hkv{kv_heads} T{t} d{d} causal", dtype, impls,
               inputs, {"fwd": flops, "bwd": 2.5 * flops, "fwd+bwd": 3.5 * flops}, "TFLOP/s")


def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def bench_attention(rows, quick):
    dtype, batch, heads = torch.bfloat16, 4, 16
    cases = [(t, 128) for t in (1024, 2048)] if quick else \
        [(t, d) for d in (64, 128) for t in (1024, 2048, 4096, 8192)]
    for t, d in cases:
        inputs = leaves(*(torch.randn(batch, heads, t, d, device="cuda", dtype=dtype) for _ in range(3)))
        impls = {"triton": lambda q, k, v: ops.attention(q, k, v, True, "triton"),
                 "sdpa flash": sdpa_flash}
        if t <= EAGER_ATTENTION_MAX_T:
            impls.update(both_compiled(lambda q, k, v: attention_reference(q, k, v, True)))
        flops = 4 * batch * heads * t * t * d * 0.5  # causal: half the score matrix
        shape = f"B{batch} H{heads} T{t} d{d} causal"
        timings = run_op(rows, "attention", shape, dtype, impls, inputs,
                         {"fwd": flops, "bwd": 2.5 * flops, "fwd+bwd": 3.5 * flops}, "TFLOP/s")
        if t >= 2048 and d == 128:
            for mode, threshold in (("fwd", 1.0), ("bwd", 0.8)):
                if ("sdpa flash", mode) in timings and ("triton", mode) in timings:
                    speedup = timings["sdpa flash", mode] / timings["triton", mode]
                    set_target(rows, "attention", shape, "triton", mode,
                               f">={threshold}x SDPA flash speed", speedup, threshold)


def _targets(n, vocab):
    targets = torch.randint(0, vocab, (n,), device="cuda")
    targets[::10] = -100
    return targets


def bench_cross_entropy(rows, quick):
    n = 4096 if quick else 16384
    for vocab in (32768, 131072) if quick else (32768, 65536, 131072):
        logits_inputs = leaves(torch.randn(n, vocab, device="cuda"), _targets(n, vocab))
        impls = {"triton": lambda x, t: ops.cross_entropy(x, t, backend="triton"),
                 **both_compiled(lambda x, t: cross_entropy_reference(x, t, -100, "mean"))}
        size = n * vocab * 4
        run_op(rows, "cross_entropy", f"{n}x{vocab}", torch.float32, impls, logits_inputs,
               {"fwd": 2 * size, "bwd": size, "fwd+bwd": 2 * size}, "GB/s")

        dim, dtype = 2048, torch.bfloat16
        inputs = leaves(torch.randn(n, dim, device="cuda", dtype=dtype),
                        torch.randn(vocab, dim, device="cuda", dtype=dtype) * 0.02,
                        _targets(n, vocab))
        impls = {"triton": lambda h, w, t: ops.linear_cross_entropy(h, w, None, t, backend="triton"),
                 **both_compiled(lambda h, w, t: linear_cross_entropy_reference(h, w, None, t, -100, "mean"))}
        flops = 2 * n * dim * vocab
        shape = f"{n}x{dim} V{vocab}"
        run_op(rows, "linear_cross_entropy", shape, dtype, impls, inputs,
               {"fwd": flops, "bwd": 2 * flops, "fwd+bwd": 3 * flops}, "TFLOP/s")
        peaks = {r["impl"]: float(r["peak_mib"]) for r in rows
                 if (r["op"], r["shape"], r["mode"]) == ("linear_cross_entropy", shape, "fwd+bwd")}
        if vocab == 131072 and {"triton", "torch"} <= peaks.keys():
            set_target(rows, "linear_cross_entropy", shape, "triton", "fwd+bwd",
                       ">=4x less peak memory than eager", peaks["torch"] / peaks["triton"], 4.0)


def bench_bias_gelu(rows, quick):
    dtype = torch.bfloat16
    for n, dim in [(16384, 4096)] if quick else [(16384, 4096), (16384, 16384)]:
        inputs = leaves(torch.randn(n, dim, device="cuda", dtype=dtype),
                        torch.randn(dim, device="cuda", dtype=dtype))
        impls = {"triton": lambda x, b: ops.bias_gelu(x, b, "tanh", "triton"),
                 **both_compiled(lambda x, b: bias_gelu_reference(x, b, "tanh"))}
        size = n * dim * dtype.itemsize
        run_op(rows, "bias_gelu", f"{n}x{dim}", dtype, impls, inputs,
               {"fwd": 2 * size, "bwd": 3 * size, "fwd+bwd": 5 * size}, "GB/s")


def bench_batch_norm(rows, quick):
    for shape in [(32, 256, 56, 56)] if quick else [(32, 256, 56, 56), (64, 512, 28, 28)]:
        channels = shape[1]
        inputs = leaves(torch.randn(shape, device="cuda"), torch.ones(channels, device="cuda"),
                        torch.zeros(channels, device="cuda"))
        impls = {"triton": lambda x, w, b: ops.batch_norm(x, w, b, 1e-5, True, "triton")[0],
                 **both_compiled(lambda x, w, b: batch_norm_reference(x, w, b, 1e-5, True)[0])}
        size = math.prod(shape) * 4
        run_op(rows, "batch_norm+relu", "x".join(map(str, shape)), torch.float32, impls, inputs,
               {"fwd": 2 * size, "bwd": 3 * size, "fwd+bwd": 5 * size}, "GB/s")


def bench_adamw(rows, quick):
    """One optimizer step over a GPT-2-medium-like stage (fp32 parameters)."""
    layer = [(1024, 3072), (3072,), (1024, 1024), (1024,), (4096, 1024), (4096,), (1024, 4096),
             (1024,), (1024,), (1024,), (1024,), (1024,)]
    shapes = layer * (6 if quick else 24)
    numel = sum(math.prod(s) for s in shapes)
    optimizers = {"triton": lambda p: ops.AdamW(p, backend="triton"),
                  "torch foreach": lambda p: torch.optim.AdamW(p, foreach=True),
                  "torch fused": lambda p: torch.optim.AdamW(p, fused=True)}
    timings = {}
    for name, make in optimizers.items():
        params = [torch.randn(s, device="cuda", requires_grad=True) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = make(params)
        ms = do_bench(optimizer.step)
        timings[name] = ms
        gbps = 7 * numel * 4 / (ms * 1e-3) / 1e9  # read p, g, m, v; write p, m, v
        rows.append(dict(op="adamw", shape=f"{len(shapes)} tensors {numel / 1e6:.0f}M", dtype="float32",
                         impl=name, mode="step", ms=f"{ms:.4f}", rate=f"{gbps:.1f}", unit="GB/s",
                         peak_mib=f"{peak_mib(optimizer.step):.0f}", target="", achieved="", met=""))
        del optimizer, params
    speedup = timings["torch foreach"] / timings["triton"]
    set_target(rows, "adamw", rows[-1]["shape"], "triton", "step", ">=1.0x torch foreach speed",
               speedup, 1.0)


def markdown_table(rows) -> str:
    columns = [f for f in FIELDS if f != "gpu"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small subset of the shapes")
    parser.add_argument("--csv", default=str(Path(__file__).with_name("kernels.csv")),
                        help="where to append one row per case")
    parser.add_argument("--markdown", default=str(Path(__file__).parents[1] / "BENCHMARKS.md"),
                        help="where to append the table, headed with the GPU and date")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU (none found): nothing to measure.")
        return 0
    gpu = torch.cuda.get_device_name()
    rows = []
    copy_gbps = bench_copy(rows)
    for bench in (lambda r, q: bench_layer_norm(r, q, copy_gbps), bench_attention,
                  bench_cross_entropy, bench_bias_gelu, bench_batch_norm, bench_adamw,
                  lambda r, q: bench_rms_norm(r, q, copy_gbps), bench_rope, bench_swiglu,
                  bench_grouped_query_attention):
        bench(rows, args.quick)
        torch.cuda.empty_cache()
    path = Path(args.csv)
    new_file = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        writer.writerows(dict(row, gpu=gpu) for row in rows)
    section = (f"\n### Triton kernels on {gpu}, {datetime.date.today()} "
               f"(`python bench/kernels.py{' --quick' if args.quick else ''}`)\n\n{markdown_table(rows)}\n")
    print(section)
    with open(args.markdown, "a") as f:
        f.write(section)
    print(f"rows appended to {path}; table appended to {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
