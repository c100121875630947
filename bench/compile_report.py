"""Compile every kernel every launcher can launch, ahead of time, for A100 (sm_80) and H100 (sm_90).

No GPU needed: the launchers are called on meta tensors with launches recorded instead of run
(kernels/aot.py), and each recorded (kernel, config) is compiled with triton's bundled ptxas. One
table row per (kernel, target, dtype): configs compiled / total, largest shared memory vs the
target's per-block limit, most registers per thread, configs that spill, and the tensor-core
instruction in the PTX (wgmma on sm_90, mma on sm_80). Exit status 1 when any launchable config
fails to compile, needs more shared memory than a block may have, spills registers, runs a dot
without tensor cores in fp16/bf16, or gets a grid over CUDA's limits.

    python bench/compile_report.py                      # everything, sm_80 and sm_90 (minutes)
    python bench/compile_report.py --targets 90 --one-config --jobs 2   # the CI subset
    python bench/compile_report.py --targets device     # the GPU this runs on
    python bench/compile_report.py --targets 100        # B200 (sm_100, tcgen05): the bundled
                                                        # ptxas handles it too
"""
import os

os.environ["TRITON_INTERPRET"] = "0"  # before anything imports triton: compile, don't interpret
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import argparse  # noqa: E402
import multiprocessing  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minipipe.kernels import aot  # noqa: E402

_jobs = []  # (launch, config, capability), shared with forked workers


def _compile(index):
    launch, config, capability = _jobs[index]
    return index, aot.compile_launch(launch, config, capability)


def parse_targets(text: str) -> list[int]:
    if text == "device":
        import torch
        major, minor = torch.cuda.get_device_capability()
        return [major * 10 + minor]
    targets = [int(t) for t in text.split(",")]
    unknown = [t for t in targets if t not in aot.SHARED_LIMITS]
    if unknown:
        raise SystemExit(f"--targets: no shared-memory limit known for {unknown}; "
                         f"choose from {sorted(aot.SHARED_LIMITS)}")
    return targets


def select(launches, kernel_filter, one_config):
    pairs = aot.unique_compiles(launches)
    if kernel_filter:
        pairs = [(l, c) for l, c in pairs if any(k in l.name for k in kernel_filter)]
    if one_config:
        # The sweep goes from small to demanding inputs: keep the last launch, its first config.
        chosen = {}
        for launch, config in pairs:
            if chosen.get((launch.name, launch.dtype), (None,))[0] is not launch:
                chosen[(launch.name, launch.dtype)] = (launch, config)
        pairs = list(chosen.values())
    return pairs


def problems_of(launch, config, capability, result):
    where = f"{launch.name} sm_{capability} {launch.dtype} [{launch.variant}] {aot.describe(config)}"
    if result.error:
        return [f"{where}: does not compile: {result.error}"]
    found = []
    if result.shared > aot.SHARED_LIMITS[capability]:
        found.append(f"{where}: {result.shared} B shared > {aot.SHARED_LIMITS[capability]} B")
    if result.spill_bytes:
        found.append(f"{where}: spills {result.spill_bytes} B/thread ({result.registers} registers)")
    if result.has_dot and launch.dtype != "fp32" and not result.tensor_core_op:
        found.append(f"{where}: tl.dot without tensor-core instructions")
    return found


def table(rows) -> str:
    lines = ["| kernel | target | dtype | configs ok / total | max shared (B) / limit | max regs | "
             "spilling configs | tensor cores |", "|---|---|---|---|---|---|---|---|"]
    for (name, capability, dtype), results in rows.items():
        ok = [r for r in results if not r.error]
        spilling = [r for r in ok if r.spill_bytes]
        shared = max((r.shared for r in ok), default=0)
        cores = sorted({r.tensor_core_op for r in ok if r.has_dot}) or ["-" if not any(
            r.has_dot for r in ok) else "none"]
        lines.append(f"| {name} | sm_{capability} | {dtype} | {len(ok)} / {len(results)} | "
                     f"{shared:,} / {aot.SHARED_LIMITS[capability]:,} | "
                     f"{max((r.registers for r in ok), default=0)} | "
                     f"{len(spilling)}{f' (max {max(r.spill_bytes for r in spilling)} B)' if spilling else ''} | "
                     f"{', '.join(c or 'none' for c in cores)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default="80,90",
                        help="compute capabilities, comma-separated (80, 90, 100), or 'device'")
    parser.add_argument("--kernels", default="", help="only kernels whose name contains one of "
                                                      "these comma-separated strings")
    parser.add_argument("--dtypes", default=",".join(aot.DTYPES), help="fp32,fp16,bf16")
    parser.add_argument("--one-config", action="store_true",
                        help="one launch and config per kernel and dtype (the CI subset)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compiles")
    args = parser.parse_args(argv)

    targets = parse_targets(args.targets)
    with aot.record_launches() as launches:
        aot.launcher_sweep(tuple(args.dtypes.split(",")))
    pairs = select(launches, [k for k in args.kernels.split(",") if k], args.one_config)
    _jobs[:] = [(launch, config, cap) for cap in targets for launch, config in pairs]
    start = time.perf_counter()
    print(f"compiling {len(_jobs)} (kernel, config) pairs for {', '.join(f'sm_{t}' for t in targets)}"
          f" with {args.jobs} jobs", file=sys.stderr, flush=True)
    results = [None] * len(_jobs)
    with multiprocessing.get_context("fork").Pool(max(args.jobs, 1)) as pool:
        for done, (index, result) in enumerate(pool.imap_unordered(_compile, range(len(_jobs))), 1):
            results[index] = result
            if done % 25 == 0:
                print(f"  {done}/{len(_jobs)}", file=sys.stderr, flush=True)

    with aot.record_launches() as large_launches:
        aot.launcher_sweep(("bf16",), aot.LARGE)
    problems = aot.grid_problems(large_launches) + [f"{name}: launched by no launcher in the sweep"
                                              for name in aot.unrecorded_kernels(launches)]
    rows = defaultdict(list)
    for (launch, config, cap), result in zip(_jobs, results):
        rows[(launch.name, cap, launch.dtype)].append(result)
        problems += problems_of(launch, config, cap, result)
    print(table(rows))
    print(f"\n{len(_jobs)} compiles in {time.perf_counter() - start:.0f} s")
    for problem in problems:
        print(f"PROBLEM {problem}")
    print(f"{len(problems)} problems" if problems else "no problems: every launchable config "
          "compiles, fits in shared memory and does not spill")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
