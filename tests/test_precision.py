"""Precision defaults: --dtype auto resolves by device, and MFU divides by the peak of the device
and precision actually used, matching CUDA device names by whole words."""
import pytest

from minipipe.config import make_config, resolve_dtype
from minipipe.tracking.metrics import compute_precision, flops_utilisation, peak_tflops

TINY = dict(preset="tiny", layers=2, d_model=16, heads=2, max_seq_len=16, steps=1)


def test_auto_dtype_is_bfloat16_on_cuda_and_float32_on_cpu():
    assert resolve_dtype("auto", "cuda") == "bfloat16"
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("float16", "cuda") == "float16"  # an explicit choice passes through
    # the config a run (and its checkpoints and logs) carries holds the resolved dtype
    assert make_config(**TINY, device="cpu").dtype == "float32"
    assert make_config(**TINY, device="cpu", dtype="float64").dtype == "float64"


# (name as torch.cuda.get_device_name reports it, bf16 peak): the near-misses first
@pytest.mark.parametrize("name, bf16", [
    ("NVIDIA L4", 121.0), ("NVIDIA L40", 181.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 NVL", 835.0), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H200", 989.0), ("NVIDIA GH200 480GB", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA A10G", 70.0), ("NVIDIA A10", 125.0),
    ("NVIDIA GeForce RTX 4090", 165.2), ("NVIDIA B200", 2250.0)])
def test_peak_table_matches_whole_words_of_the_device_name(name, bf16):
    assert peak_tflops(name, "bf16") == bf16


def test_unknown_device_gets_no_mfu():
    assert peak_tflops("NVIDIA L", "bf16") is None
    assert "mfu" not in flops_utilisation(100.0, 1e12, 1, "Tesla V100-SXM2-16GB", "bf16")


def test_mfu_uses_the_peak_of_the_precision_computed_in():
    assert compute_precision("bfloat16", tf32=True) == "bf16"
    assert compute_precision("float16", tf32=False) == "bf16"
    assert compute_precision("float32", tf32=True) == "tf32"
    assert compute_precision("float32", tf32=False) == "fp32"
    # 156 TFLOP/s achieved on an A100: half of the bf16 peak, all of the TF32 peak
    achieved = dict(units_per_s=156e12 / 1e9, flops_per_unit=1e9, n_devices=1,
                    device_name="NVIDIA A100-SXM4-80GB")
    assert flops_utilisation(**achieved, precision="bf16")["mfu"] == pytest.approx(0.5)
    assert flops_utilisation(**achieved, precision="tf32")["mfu"] == pytest.approx(1.0)
