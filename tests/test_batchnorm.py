"""PipelineBatchNorm2d: per-micro-batch normalisation, deferred statistics, frozen replays."""
import torch

from minipipe.models.batchnorm import PipelineBatchNorm2d
from minipipe.pipeline.running_stats import commit_deferred, frozen, stats_layers


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
    commit_deferred(stats_layers(norm), None)
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
    with frozen(norm):
        norm(batch)
    assert torch.equal(norm.running_mean, tracked)


def test_deferred_statistics_of_every_layer_travel_in_one_collective():
    """dp=2 with two BatchNorm layers per stage: one all-reduce carries both layers' sums, and each
    layer's statistics equal one update from both replicas' rows."""
    data = {replica: [torch.randn(4, 3, 5, 4, dtype=torch.float64) for _ in range(2)] for replica in "ab"}
    norms = {replica: [PipelineBatchNorm2d(3, "torch", deferred=True).double() for _ in range(2)]
             for replica in "ab"}
    for replica in "ab":
        for norm, batch in zip(norms[replica], data[replica]):
            norm(batch)
    sums_of_b = []
    commit_deferred(norms["b"], sums_of_b.append)  # replica b: what it contributes
    calls = []

    def all_reduce(flat):  # replica a's side of the sum
        calls.append(flat.numel())
        flat.add_(sums_of_b[0])
    commit_deferred(norms["a"], all_reduce)
    assert calls == [2 * (2 * 3 + 1)]  # one collective: [sum, sum of squares] x 3 channels + count, per layer
    for layer in range(2):
        ref = _reference_after([torch.cat([data["a"][layer], data["b"][layer]])])
        torch.testing.assert_close(norms["a"][layer].running_var, ref.running_var, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(norms["a"][layer].running_mean, ref.running_mean, rtol=1e-12, atol=1e-14)
