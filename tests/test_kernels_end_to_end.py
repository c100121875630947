"""Every model family trains with --kernels triton (the interpreter on CPU) with the losses of
--kernels torch.

The first step's loss agrees within the float32 tolerance of kernels.testing.TOLERANCES. Later
steps are compared against the float64 trajectory instead of against each other: some parameters
have an analytically zero gradient (the attention key bias; BatchNorm biases whose shift a later
BatchNorm removes), so float32 rounding noise is all their gradient holds, and AdamW scales that
noise up to lr-sized updates in any float32 implementation. Triton must stay as close to the
float64 run as torch's own float32 ops do.
"""
import pytest
import torch

from minipipe.kernels.testing import TOLERANCES
from tests.harness import run_steps

MODELS = {
    "transformer": dict(model="transformer", layers=1, d_model=32, heads=2, max_seq_len=16,
                        data="synthetic", batch_size=4),
    "amoebanet": dict(model="amoebanet", cells=1, filters=4, image_size=8, channels=3,
                      data="synthetic", batch_size=4),  # every BatchNorm, incl. the fused ReLU
    # RMSNorm, RoPE, SwiGLU and grouped-query flash attention (2 query heads per kv head)
    "llama": dict(model="llama", layers=1, d_model=64, heads=4, kv_heads=2, ffn_dim=48, max_seq_len=16,
                  data="synthetic", batch_size=4),
}


@pytest.mark.parametrize("family", MODELS)
def test_triton_kernels_train_with_the_torch_losses(family):
    case = dict(MODELS[family], microbatches=2, lr=1e-2, warmup=0)
    torch32 = run_steps(3, **case, kernels="torch")["losses"]
    triton = run_steps(3, **case, kernels="triton")["losses"]
    exact = run_steps(3, **case, kernels="torch", dtype="float64")["losses"]
    torch.testing.assert_close(triton[0], torch32[0], **TOLERANCES[torch.float32])
    rtol = TOLERANCES[torch.float32]["rtol"]
    for step, (ours, theirs, truth) in enumerate(zip(triton, torch32, exact)):
        allowed = max(2 * abs(theirs - truth), rtol * abs(truth))
        assert abs(ours - truth) <= allowed, (
            f"step {step}: triton is {abs(ours - truth):.2e} from float64, torch float32 "
            f"{abs(theirs - truth):.2e}")
