"""PipelineBatchNorm2d: per-micro-batch normalisation, deferred statistics, frozen replays."""
import torch

from models.batchnorm import PipelineBatchNorm2d, commit_deferred_stats, frozen_running_stats


def _reference_after(batches):
    ref = torch.nn.BatchNorm2d(3, momentum=0.1).double()
    for batch in batches:
        ref(batch)
    return ref


def test_deferred_statistics_equal_one_full_batch_update():
    micro = [torch.randn(n, 3, 5, 4, dtype=torch.float64) for n in (4, 4, 3)]
    norm = PipelineBatchNorm2d(3, "torch", deferred=True).double()
    for batch in micro:
        norm(batch)
    assert torch.equal(norm.running_mean, torch.zeros(3))  # nothing until the commit
    commit_deferred_stats(norm)
    ref = _reference_after([torch.cat(micro)])
    torch.testing.assert_close(norm.running_mean, ref.running_mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(norm.running_var, ref.running_var, rtol=1e-12, atol=1e-14)


def test_per_microbatch_statistics_match_torch_batchnorm_per_microbatch():
    micro = [torch.randn(4, 3, 5, 4, dtype=torch.float64) for _ in range(3)]
    norm = PipelineBatchNorm2d(3, "torch", deferred=False).double()
    outputs = [norm(batch) for batch in micro]
    ref = torch.nn.BatchNorm2d(3, momentum=0.1).double()
    for batch, out in zip(micro, outputs):
        torch.testing.assert_close(out, ref(batch), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm.running_var, ref.running_var, rtol=1e-12, atol=1e-14)
    norm.eval(), ref.eval()
    torch.testing.assert_close(norm(micro[0]), ref(micro[0]), rtol=1e-12, atol=1e-12)


def test_recompute_replay_does_not_track_twice():
    batch = torch.randn(4, 3, 5, 4, dtype=torch.float64)
    norm = PipelineBatchNorm2d(3, "torch", deferred=False).double()
    norm(batch)
    tracked = norm.running_mean.clone()
    with frozen_running_stats(norm):
        norm(batch)
    assert torch.equal(norm.running_mean, tracked)
