#!/usr/bin/env bash
# Everything only a GPU can show, in one command and one lease (under 20 minutes on one H100):
#   1. the kernel tests on the device (bf16 included: the interpreter skips those),
#   2. the full compile report against the device's own compute capability,
#   3. bench/kernels.py (--quick),
#   4. a short 1-GPU training run with --kernels triton beside --kernels torch, for the
#      Transformer and for Llama (RMSNorm, RoPE, SwiGLU, grouped-query attention): loss curves
#      must agree; tokens/s and peak memory side by side,
#   5. a 1-stage NCCL run under torchrun (its warm-up time in the log),
#   6. the engine and comm on the device: no synchronising call in any per-micro-batch action
#      or exchange (torch.cuda.set_sync_debug_mode("error")), CUDA-event spans, timed / untimed
#      step time,
#   7. --balance-by time under bf16 (layer-at-a-time profiling on the device),
#   8. with two GPUs or more: 2-stage NCCL runs of every schedule, set_device under a caller's
#      group, dropout seeding the value's GPU,
# then appends a dated section with the device name to BENCHMARKS.md.
#
# Needs the test environment (pip install -e ".[dev]": pytest) and torchrun; it checks first.
#
#   bash bench/gpu_check.sh              # on the GPU machine, from anywhere
#   bash bench/gpu_check.sh --dry-run    # on a CPU machine: every part, tiny, against the CPU;
#                                        # the section goes to $OUT/BENCHMARKS.dry-run.md
# Each part has its own time limit and log ($OUT/<part>.log); a failing part does not stop the
# others, and the script exits 1 if any failed.
set -euo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=disabled

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
elif [[ $# -gt 0 ]]; then
  echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2
  exit 2
fi
# What the parts run, checked before any of them: python with torch, torchrun, and pytest (the
# test environment: the README's second set-up command).
missing=()
for module in torch pytest; do python -c "import $module" 2> /dev/null || missing+=("$module"); done
command -v torchrun > /dev/null || missing+=(torchrun)
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "bench/gpu_check.sh needs python with torch, torchrun and pytest; missing: ${missing[*]}." >&2
  echo "Install the test environment first: pip install -e \".[dev]\" (after the torch build you want)." >&2
  exit 2
fi
OUT=${GPU_CHECK_OUT:-out/gpu_check}
mkdir -p "$OUT"
: > "$OUT/parts.md"
FAILED=0

# part NAME LIMIT_SECONDS COMMAND...: run bounded, log to $OUT/NAME.log, record status and time.
part() {
  local name=$1 limit=$2 status=0 start=$SECONDS
  shift 2
  echo "== $name (at most ${limit}s): $*"
  timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1 || status=$?
  local verdict=ok
  if [[ $status -eq 124 || $status -eq 137 ]]; then verdict="timed out"; elif [[ $status -ne 0 ]]; then verdict="failed ($status)"; fi
  [[ $verdict == ok ]] || FAILED=1
  echo "   $verdict in $((SECONDS - start)) s"
  echo "| $name | $verdict | $((SECONDS - start)) s |" >> "$OUT/parts.md"
}

if [[ $DRY_RUN -eq 1 ]]; then
  DEVICE=cpu
  KERNEL_TESTS=(tests/test_kernel_gelu.py)
  REPORT_ARGS=(--targets 90 --one-config --kernels _bias_gelu --jobs 2)
  # the interpreter runs Triton programs one after another: the smallest model that has every op
  TRAIN_ARGS=(--device cpu --layers 1 --d-model 16 --heads 1 --max-seq-len 16 --batch-size 2
              --microbatches 1 --log-every 1)
  TRAIN_STEPS=2
  LLAMA_ARGS=(--kv-heads 1 --ffn-dim 16)  # the Llama of that size: one query head per kv head
else
  DEVICE=cuda
  KERNEL_TESTS=(tests/test_kernel_*.py tests/test_kernels_end_to_end.py)
  REPORT_ARGS=(--targets device --jobs "$(nproc)")
  TRAIN_ARGS=(--device cuda --preset small --log-every 10)
  TRAIN_STEPS=200
  LLAMA_ARGS=()  # the small preset: 6 heads over 2 key/value heads
fi
TRAIN_COMMON=(--eval-every 0 --wandb disabled --seed 1337 "${TRAIN_ARGS[@]}")

part kernel_tests 600 python -m pytest -q "${KERNEL_TESTS[@]}"
part engine_on_device 300 python -m pytest -q -s tests/test_gpu_engine.py tests/test_comm_nccl.py
part compile_report 600 python bench/compile_report.py "${REPORT_ARGS[@]}"
if [[ $DRY_RUN -eq 1 ]]; then
  part kernel_bench 120 python bench/kernels.py --help  # the benchmark itself needs CUDA
else
  part kernel_bench 600 python bench/kernels.py --quick --csv "$OUT/kernels.csv"
fi
for backend in triton torch; do
  rm -f "$OUT/train_$backend.jsonl"
  part "train_$backend" 600 python train.py --kernels "$backend" \
    --metrics-jsonl "$OUT/train_$backend.jsonl" --out-dir "$OUT" "${TRAIN_COMMON[@]}" \
    --steps "$TRAIN_STEPS"
  rm -f "$OUT/train_llama_$backend.jsonl"
  part "train_llama_$backend" 600 python train.py --model llama --kernels "$backend" \
    --metrics-jsonl "$OUT/train_llama_$backend.jsonl" --out-dir "$OUT" "${TRAIN_COMMON[@]}" \
    "${LLAMA_ARGS[@]}" --steps "$TRAIN_STEPS"
done
# --balance-by time profiles one layer at a time on the device, under bf16 autocast
part balance_by_time 300 python train.py --balance-by time --dtype "$([[ $DRY_RUN -eq 1 ]] && echo float32 || echo bfloat16)" \
  --out-dir "$OUT" "${TRAIN_COMMON[@]}" --steps 2
rm -f "$OUT/train_nccl.jsonl"
part train_1stage_torchrun 300 torchrun --standalone --nproc_per_node=1 train.py \
  --metrics-jsonl "$OUT/train_nccl.jsonl" --out-dir "$OUT" "${TRAIN_COMMON[@]}" \
  --steps "$((TRAIN_STEPS < 20 ? TRAIN_STEPS : 20))"

# Two GPUs or more: stages exchange over NCCL (NCCL refuses two ranks on one GPU). The lanes keep
# 1f1b and interleaved at K = 2 (traffic both ways) free of deadlock; set_device with a caller's group.
if [[ $DRY_RUN -eq 0 && $(python -c "import torch; print(torch.cuda.device_count())") -ge 2 ]]; then
  for schedule in gpipe 1f1b interleaved; do
    part "nccl_2stage_$schedule" 300 torchrun --standalone --nproc_per_node=2 train.py --device cuda \
      --stages 2 --schedule "$schedule" --virtual-stages "$([[ $schedule == interleaved ]] && echo 2 || echo 1)" \
      --microbatches 4 --steps 20 --out-dir "$OUT" "${TRAIN_COMMON[@]}"
  done
  part set_device 120 env LOCAL_RANK=1 RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 \
    python -c "
import torch, torch.distributed as dist
from minipipe.dist import init_process_groups
dist.init_process_group('nccl')
layout = init_process_groups(1, 1, 60, 'cuda')
assert torch.cuda.current_device() == 1 == layout.device.index, torch.cuda.current_device()
dist.destroy_process_group()"
  # dropout seeds the generator of the value's GPU, not the current one's
  part dropout_device 120 python -c "
import torch
from minipipe.pipeline.stage import Stage
masks = []
for current in (1, 0):
    torch.cuda.set_device(current)
    stage = Stage({0: torch.nn.Dropout(0.5)}, seed=7).to('cuda:1').train()
    masks.append(stage(torch.ones(1000, device='cuda:1'), step=3, microbatch=2))
assert torch.equal(*masks), 'the mask depends on the current device'"
fi

if [[ $DRY_RUN -eq 1 ]]; then
  TARGET="$OUT/BENCHMARKS.dry-run.md"
else
  TARGET=BENCHMARKS.md
fi
python - "$OUT" "$TARGET" "$DEVICE" <<'PYTHON' || FAILED=1
"""Append the dated section: parts, compile table, kernel bench table, triton vs torch training."""
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

out, target, device = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"


def records(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table_lines(log):
    text = log.read_text() if log.exists() else ""
    return [line for line in text.splitlines() if line.startswith("|")]


rows, agree = [], True
for model, prefix in (("transformer", "train_"), ("llama", "train_llama_")):
    runs = {backend: records(out / f"{prefix}{backend}.jsonl") for backend in ("triton", "torch")}
    for backend, recs in runs.items():
        losses = [r["loss"] for r in recs if "loss" in r]
        speed = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r][1:]  # past the first step
        memory = [v for r in recs for k, v in r.items() if k.startswith("peak_mem_gib")]
        rows.append(f"| {model} | {backend} | {len(losses)} | {losses[-1] if losses else float('nan'):.4f} | "
                    f"{statistics.median(speed) if speed else float('nan'):,.0f} | "
                    f"{max(memory) if memory else float('nan'):.2f} |")
    curves = [[r["loss"] for r in recs if "loss" in r] for recs in runs.values()]
    if not curves[0] or len(curves[0]) != len(curves[1]):
        agree = False
        continue
    # bf16 autocast and different reduction orders: curves agree to a few percent, not bitwise.
    worst = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(*curves))
    agree = agree and worst <= 0.05
section = [f"\n## GPU check, {datetime.date.today().isoformat()}, {name}\n",
           "`bash bench/gpu_check.sh` (parts, status, wall time):\n",
           "| part | status | time |", "|---|---|---|", *(out / "parts.md").read_text().splitlines(),
           "\nCompile report against the device:\n", *table_lines(out / "compile_report.log"),
           "\nKernel benchmark (bench/kernels.py --quick):\n", *table_lines(out / "kernel_bench.log"),
           "\nTraining, --kernels triton beside --kernels torch (same seed, data and model):\n",
           "| model | kernels | steps | last loss | tokens/s (median) | peak memory (GiB) |",
           "|---|---|---|---|---|---|", *rows,
           f"\nEvery run complete and each model's two loss curves agree within 5% at every step: "
           f"{agree}\n",
           *[line for line in (out / "engine_on_device.log").read_text().splitlines()
             if "step time" in line or "warm-up" in line],
           *[line for line in (out / "train_1stage_torchrun.log").read_text().splitlines()
             if line.startswith("warm-up")]]
with open(target, "a") as fh:
    fh.write("\n".join(section) + "\n")
print(f"appended the GPU check section to {target}")
sys.exit(0 if agree else 1)
PYTHON

echo "parts:"
cat "$OUT/parts.md"
exit "$FAILED"
