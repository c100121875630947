"""What the launchers launch, recorded without a GPU, and compiled ahead of time for a GPU target.

`record_launches()` intercepts every `kernel[grid](...)` call (plain and autotuned) instead of
running it, so calling the real launchers on meta tensors lists exactly the kernels, signatures,
constexprs and autotune configs they would launch (for an autotuned kernel: the configs left after
its own `early_config_prune`, i.e. the ones the launcher can choose). `launcher_sweep()` calls every
op's launchers over the inputs that change the generated code (dtype, head dim, causal, block size,
flags). `compile_launch()` then compiles one (launch, config) for a `GPUTarget` through triton's own
binder, so specialisation (16-byte alignment, i64 for large ints) matches a real launch.

Compiling needs TRITON_INTERPRET=0 set before triton is imported (bench/compile_report.py does it);
recording works in either mode.
"""
import os
import re
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from minipipe.kernels import (
    adamw,
    batchnorm,
    flash_attention,
    fused_cross_entropy,
    gelu,
    layernorm,
    rmsnorm,
    rope,
    swiglu,
)
from minipipe.kernels.runtime import triton

# The modules holding @triton.jit kernels: each kernel in them must be launched by launcher_sweep().
OP_MODULES = (adamw, batchnorm, flash_attention, fused_cross_entropy, gelu, layernorm, rmsnorm, rope, swiglu)

# CUDA's grid limits: x up to 2^31 - 1 blocks, y and z up to 65535.
GRID_LIMITS = (2**31 - 1, 65535, 65535)
# Largest dynamic shared memory one block may use, per compute capability (bytes).
SHARED_LIMITS = {80: 166_912, 90: 232_448, 100: 232_448}
TENSOR_CORE_OPS = {80: "mma", 90: "wgmma", 100: "tcgen05"}


@dataclass
class Launch:
    """One kernel launch as a launcher issues it; `configs` are the autotune configs it may run
    (one pseudo-config of the explicit launch options for a plain kernel)."""
    kernel: object  # the JITFunction
    dtype: str  # the sweep's dtype label
    variant: str  # what the sweep varied, for messages
    args: tuple
    kwargs: dict
    configs: list
    grid: object
    grids: list = field(default_factory=list)  # the evaluated grid of each config

    @property
    def name(self):
        return self.kernel.__name__


_active = None


def _evaluate_grid(grid, named_args):
    return tuple(grid(named_args) if callable(grid) else grid)


@contextmanager
def record_launches(dtype="", variant=""):
    """Inside: kernel launches (compiled or interpreted) are recorded into the yielded list, not
    run. Only compile the records made with the interpreter off: `kernel` is then a JITFunction."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    global _active
    launches = []
    state = {"dtype": dtype, "variant": variant}

    def autotuned_run(self, *args, grid, warmup=False, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
        named = {**self.nargs, **kwargs}
        launch = Launch(self.fn, state["dtype"], state["variant"], args, kwargs, list(configs), grid,
                        [_evaluate_grid(grid, {**named, **c.all_kwargs()}) for c in configs])
        launch.tuning_key = tuple(named[k] for k in self.keys)
        launches.append(launch)
        self.nargs = None

    def plain_run(self, *args, grid, warmup=False, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        named = {**dict(zip(self.arg_names, args)), **kwargs}
        config = triton.Config({}, **options)
        launches.append(Launch(self, state["dtype"], state["variant"], args, kwargs, [config], grid,
                               [_evaluate_grid(grid, named)]))

    classes = (Autotuner, JITFunction, InterpretedFunction)
    saved = [cls.run for cls in classes]
    Autotuner.run, JITFunction.run, InterpretedFunction.run = autotuned_run, plain_run, plain_run
    _active = state
    try:
        yield launches
    finally:
        for cls, run in zip(classes, saved):
            cls.run = run
        _active = None


@contextmanager
def _labelled(dtype, variant):
    previous = dict(_active)
    _active.update(dtype=dtype, variant=variant)
    try:
        yield
    finally:
        _active.update(previous)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _meta(*shape, dtype, grad=False):
    return torch.empty(shape, dtype=dtype, device="meta").requires_grad_(grad)


# Sizes that do not change the code: small for the compile sweep, large (on meta tensors) to check
# grids against CUDA's limits: 131,072 attention heads, 2^25 rows, 2^33 GELU elements, 2^26 per
# BatchNorm channel.
SMALL = dict(batch=2, heads=4, T=256, rows=64, images=(4, 8, 6, 6), elementwise_rows=16)
LARGE = dict(batch=1024, heads=128, T=4096, rows=2**25, images=(256, 8, 512, 512),
             elementwise_rows=2**27)


def launcher_sweep(dtype_names=tuple(DTYPES), sizes=SMALL):
    """Calls every op's launchers (forward and backward) on meta tensors over every input that
    changes the code they launch. Must run inside record_launches()."""
    for name in dtype_names:
        dtype = DTYPES[name]
        for head_dim in flash_attention.HEAD_DIMS:
            for causal in (False, True):
                with _labelled(name, f"D={head_dim} causal={causal}"):
                    q = _meta(sizes["batch"], sizes["heads"], sizes["T"], head_dim, dtype=dtype)
                    o, lse = flash_attention.attention_forward(q, q, q, causal)
                    flash_attention.attention_backward(q, q, q, q, o, lse, causal)
            # Grouped-query attention: one key/value head per 4 query heads (the group is a
            # runtime argument; the dK/dV program loops over it), last so the CI subset takes it.
            with _labelled(name, f"D={head_dim} causal=True kv_heads={sizes['heads'] // 4}"):
                q = _meta(sizes["batch"], sizes["heads"], sizes["T"], head_dim, dtype=dtype)
                kv = _meta(sizes["batch"], sizes["heads"] // 4, sizes["T"], head_dim, dtype=dtype)
                o, lse = flash_attention.attention_forward(q, kv, kv, True)
                flash_attention.attention_backward(q, q, kv, kv, o, lse, True)
        # LayerNorm's block is next_pow2(hidden) and its warps step at 2048 and 8192.
        for block in (128, 1024, 2048, 4096, 8192, layernorm.MAX_HIDDEN):
            with _labelled(name, f"hidden={block}"):
                x = _meta(sizes["rows"], block, dtype=dtype)
                w = _meta(block, dtype=dtype)
                _, mean, rstd = layernorm.layer_norm_forward(x, w, w, 1e-5)
                layernorm.layer_norm_backward(x, x, w, mean, rstd)
        for block in (128, 1024, 2048, 4096, 8192, rmsnorm.MAX_HIDDEN):  # as LayerNorm's
            with _labelled(name, f"hidden={block}"):
                x = _meta(sizes["rows"], block, dtype=dtype)
                w = _meta(block, dtype=dtype)
                _, rstd = rmsnorm.rms_norm_forward(x, w, 1e-5)
                rmsnorm.rms_norm_backward(x, x, w, rstd)
        for head_dim in (64, 128, 256):  # RoPE's block is half the head dim; warps step above 64
            with _labelled(name, f"rope D={head_dim}"):
                x = _meta(sizes["batch"], sizes["heads"], sizes["T"], head_dim, dtype=dtype)
                angles = _meta(sizes["T"], head_dim, dtype=dtype)
                rope.rotate(x, angles, angles, 1.0)
        with _labelled(name, "swiglu"):
            x = _meta(sizes["elementwise_rows"], 64, dtype=dtype)
            swiglu.swiglu_forward(x, x)
            swiglu.swiglu_backward(x, x, x)
        for vocab in (256, 2048, 4096, fused_cross_entropy.MAX_BLOCK_V):
            for reduction in fused_cross_entropy.REDUCTIONS:
                for with_grad in (False, True):
                    with _labelled(name, f"vocab={vocab} {reduction} grad={with_grad}"):
                        logits = _meta(sizes["rows"], vocab, dtype=dtype, grad=with_grad)
                        targets = torch.empty(sizes["rows"], dtype=torch.int64, device="meta")
                        fused_cross_entropy.CrossEntropyFunction.apply(logits, targets, -100,
                                                                       reduction)
        for approximate in gelu.APPROXIMATIONS:
            for has_bias in (False, True):
                with _labelled(name, f"{approximate} bias={has_bias}"):
                    x = _meta(sizes["elementwise_rows"], 64, dtype=dtype)
                    bias = _meta(64, dtype=dtype) if has_bias else None
                    gelu._launch(x, bias, None, approximate)
                    gelu._launch(x, bias, x, approximate)
        for relu in (False, True):
            with _labelled(name, f"relu={relu}"):
                x = _meta(*sizes["images"], dtype=dtype, grad=True)
                w = _meta(8, dtype=dtype, grad=True)
                y, _, _ = batchnorm.BatchNormFunction.apply(x, w, w, 1e-5, relu)
                y.backward(torch.empty_like(y))
                y = batchnorm.BatchNormEvalFunction.apply(x, w, w, w.detach(), w.detach(), 1e-5, relu)
                y.backward(torch.empty_like(y))
        if sizes is LARGE:
            continue  # AdamW's grid is one program per 4096 elements: 2^31 blocks is 8e12 params
        with _labelled(name, "adamw"):
            param = torch.zeros(8, dtype=dtype)  # addresses are read: a real (tiny) tensor
            adamw._triton_step([(param, param, param, param)], [1], 1e-3, 0.9, 0.95, 1e-8, 0.1)


def unique_compiles(launches):
    """(launch, config) pairs with duplicates (same kernel, types, constexprs, options) removed."""
    seen, jobs = set(), []
    for launch in launches:
        for config in launch.configs:
            key = (launch.name, launch.dtype, _signature_key(launch, config))
            if key not in seen:
                seen.add(key)
                jobs.append((launch, config))
    return jobs


def _int_kind(value: int) -> str:
    """What Triton specialises an int argument on: the value 1 (a constant), divisibility by 16."""
    return "1" if value == 1 else "int%16" if value % 16 == 0 else "int"


def _signature_key(launch, config):
    kwargs = {**launch.kwargs, **config.all_kwargs()}
    kinds = tuple(str(a.dtype) if torch.is_tensor(a) else _int_kind(a) if type(a) is int
                  else type(a).__name__ for a in launch.args)
    return kinds, tuple(sorted((k, str(v)) for k, v in kwargs.items()))


@dataclass
class Compiled:
    shared: int = 0
    registers: int = 0
    spill_bytes: int = 0  # local memory per thread (ptxas spill stores land there)
    has_dot: bool = False
    tensor_core_op: str = ""  # the tensor-core instruction found in the PTX, if any
    error: str = ""


def compile_launch(launch, config, capability):
    """Compiles one launch with one config for sm_<capability>, as a real launch would bind it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    kwargs = {**launch.kwargs, **config.all_kwargs()}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    try:
        bound, specialization, options = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                              specialization, options)
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                options=options.__dict__)
    except Exception as err:  # a compile error is a finding, reported with its first line
        return Compiled(error=_reason(err))
    registers, spill_bytes = _resource_usage(kernel.asm["cubin"])
    ptx = kernel.asm["ptx"]
    op = TENSOR_CORE_OPS.get(capability, "")
    found = op if re.search(rf"\b{op}\b", ptx) else ("mma" if re.search(r"\bmma\.sync\b", ptx) else "")
    return Compiled(shared=kernel.metadata.shared, registers=registers, spill_bytes=spill_bytes,
                    has_dot="tt.dot" in kernel.asm["ttir"], tensor_core_op=found)


def _reason(err: Exception) -> str:
    """The line of a (often multi-line, source-quoting) compile error that says why."""
    cause = err.__cause__ or err
    lines = [line.strip() for line in str(cause).splitlines() if re.search(r"[A-Za-z]{3}", line)]
    return f"{type(cause).__name__}: {(lines[-1] if lines else '')[:200]}"


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, spill bytes per thread) from `cuobjdump -res-usage`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        text = subprocess.run([_cuobjdump(), "-res-usage", fh.name], capture_output=True, text=True,
                              timeout=60, check=True).stdout
    registers = int(re.search(r"REG:(\d+)", text).group(1))
    stack = int(re.search(r"STACK:(\d+)", text).group(1))
    local = int(re.search(r"LOCAL:(\d+)", text).group(1))
    return registers, max(stack, local)


def describe(config) -> str:
    """A config as its block sizes, warps and stages."""
    blocks = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{blocks} warps={config.num_warps} stages={config.num_stages}".strip()


def unrecorded_kernels(launches):
    """Kernels in the kernels package that no sweep launched and no other kernel calls: a new
    kernel must get a launcher in launcher_sweep() to be compiled by the report."""
    from triton.runtime.jit import JITFunction

    recorded = {launch.kernel for launch in launches}
    jitted = {}
    for module in OP_MODULES:
        for value in vars(module).values():
            fn = getattr(value, "fn", value)
            if isinstance(fn, JITFunction):
                jitted[fn.__name__] = fn
    sources = "\n".join(fn.src for fn in jitted.values())
    return sorted(name for name, fn in jitted.items() if fn not in recorded
                  and not re.search(rf"\b{name}\(", sources.replace(f"def {name}(", "")))


def grid_problems(launches):
    """Launches whose grid (for some config) passes CUDA's per-dimension limits."""
    problems = []
    for launch in launches:
        for config, grid in zip(launch.configs, launch.grids):
            over = [f"dim {i} = {n} > {limit}" for i, (n, limit) in enumerate(zip(grid, GRID_LIMITS))
                    if n > limit]
            if over:
                problems.append(f"{launch.name} [{launch.variant}] {describe(config)}: "
                                f"{', '.join(over)}")
    return problems
