"""The kernels compile for a real GPU: the CI subset of bench/compile_report.py (one launch and
config per kernel and dtype, the most demanding input the sweep has, for H100's sm_90), run as a
subprocess because the report turns Triton's interpreter off. The full report (every config, sm_80
and sm_90) is `python bench/compile_report.py`."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ["_attn_fwd", "_attn_bwd_delta", "_attn_bwd_dkdv", "_attn_bwd_dq", "_layer_norm_fwd",
           "_layer_norm_bwd", "_cross_entropy_kernel", "_bias_gelu_kernel", "_bn_stats",
           "_bn_normalise", "_bn_bwd_reduce", "_bn_bwd_dx", "_adamw_kernel", "_rms_norm_fwd",
           "_rms_norm_bwd", "_rope_kernel", "_swiglu_fwd", "_swiglu_bwd"]


@pytest.mark.skipif(sys.platform != "linux", reason="triton's bundled ptxas is Linux-only")
def test_every_kernel_compiles_for_sm90_without_spills_or_shared_memory_overflow():
    pytest.importorskip("triton")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "bench/compile_report.py", "--targets", "90",
                             "--one-config", "--jobs", "2"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    rows = re.findall(r"^\| (\w+) \| sm_90 \| (\w+) \| 1 / 1 \|", result.stdout, re.M)
    assert sorted(rows) == sorted((k, d) for k in KERNELS for d in ("fp32", "fp16", "bf16"))
    # bf16/fp16 dots run on Hopper's tensor cores
    assert re.search(r"^\| _attn_fwd \| sm_90 \| bf16 \|.*\| wgmma \|$", result.stdout, re.M)
