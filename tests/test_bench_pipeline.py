"""bench/pipeline.py compares like with like: each of torch's seven schedules, on the chunks the
bench gives it (the same cut, layers from (seed, layer), logits made in the last chunk), computes
the loss and the global gradient norm of minipipe's gpipe step on the same batch, and its AdamW
step leaves the same weights."""
import argparse
import importlib.util
import os

import pytest

from tests.spawn import REPO_ROOT, run_workers


def _bench_pipeline():
    spec = importlib.util.spec_from_file_location("bench_pipeline", os.path.join(REPO_ROOT, "bench", "pipeline.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _one_step_each(rank, world_size, recompute):
    from minipipe.build import build_run
    from minipipe.config import make_config
    from minipipe.layers import layer_param_numels
    bench = _bench_pipeline()
    # grad_clip 1e9: both compute the global norm, neither clips; no weight decay: torch's AdamW
    # would decay the vectors minipipe leaves alone
    cfg = make_config(model="transformer", layers=2, d_model=32, heads=2, max_seq_len=16, data="synthetic",
                      batch_size=8, microbatches=4, grad_clip=1e9, weight_decay=0.0, eval_every=0,
                      device="cpu", recompute=recompute)
    run = build_run(cfg)
    batch = run.dataset.batch(0, cfg.batch_size)
    ours = run.engine.train_step(*batch, 0, cfg.lr, cfg.grad_clip)
    args = argparse.Namespace(virtual_stages=2, recompute=recompute)
    per_layer = [len(numels) for numels in layer_param_numels(run.cfg)]
    theirs = {}
    for name in bench.TORCH_SCHEDULES:
        step, params, chunks = bench.torch_contender(name, run.cfg, run.layout, cfg.microbatches, args,
                                                     grad_clip=cfg.grad_clip)
        loss, grad_norm = step(*batch, lr=cfg.lr)
        ranges = bench.model_cut(run.cfg, len(chunks) * world_size)
        diffs, remaining = [], list(params)
        for i in [i for c in chunks for i in ranges[c]]:
            layer_params, remaining = remaining[:per_layer[i]], remaining[per_layer[i]:]
            if str(i) in run.stage.layers:  # minipipe's gpipe holds this layer here too
                diffs += [float((a - b).abs().max()) for a, b in
                          zip(layer_params, run.stage.layers[str(i)].parameters(), strict=True)]
        theirs[name] = (loss, grad_norm, max(diffs, default=0.0), len(diffs), not remaining)
    return ours, theirs


@pytest.mark.parametrize("recompute", ["never", "always"])
def test_every_torch_schedule_takes_minipipes_step_on_the_bench_chunks(recompute):
    outcomes = run_workers(_one_step_each, 2, recompute)
    losses = {name: [] for name in outcomes[0][1]}
    compared_tensors = dict.fromkeys(losses, 0)
    assert len(losses) == 7
    for ours, theirs in outcomes:
        for name, (loss, grad_norm, diff, compared, all_mapped) in theirs.items():
            assert all_mapped, name
            compared_tensors[name] += compared
            assert grad_norm == pytest.approx(ours["grad_norm"], rel=1e-5), name
            assert diff < 1e-6, (name, diff)
            if loss is not None:
                losses[name].append(loss)
                assert loss == pytest.approx(ours["loss"], rel=1e-6), name
    assert all(len(found) == 1 for found in losses.values()), losses  # one rank holds the last chunk
    assert all(count > 0 for count in compared_tensors.values()), compared_tensors
