"""--tie-embeddings: the pipeline equals a single-device model whose head shares the embedding's
Parameter (float64, K = 1, 2, 3, M = 1, 4, recompute always/never; 1f1b, interleaved and zbv too), the two copies stay bitwise
equal after every step, and a K=2 checkpoint (the weight stored once) resumes at K=1 and K=3."""
import pytest
import torch
from safetensors.torch import load_file

import train
from minipipe import plan
from minipipe.config import make_config
from minipipe.layers import build_layers, layer_param_numels
from minipipe.tracking.metrics import MetricsLogger, config_record
from tests.harness import assert_close_tensors, merge_stages, reference_steps, run_steps
from tests.spawn import run_workers

MODEL = dict(model="transformer", layers=4, d_model=16, heads=2, max_seq_len=8, data="synthetic",
             dtype="float64", batch_size=8, lr=1e-2, warmup=0, tie_embeddings=True)  # 6 layers
SOURCE = "layers.0.tokens.weight"  # the tied weight's one stored name
HEAD = "layers.5.proj.weight"  # the head's copy of it
GRID = [(m, recompute, "gpipe", 1) for m in (1, 4) for recompute in ("always", "never")]
GRID += [(4, "always", "1f1b", 1), (4, "never", "interleaved", 2)]  # the sum is after any drain
GRID += [(4, "never", "zbv", 2)]  # the V: stage 0 holds the first and the last chunk, one Parameter
STEPS = 3
RESUME = dict(MODEL, microbatches=2, steps=3, eval_every=0, log_every=100, wandb="disabled")


def _cases(n_stages):
    return [case for case in GRID if case[2] != "interleaved" or case[0] % n_stages == 0]


def _grid(n_stages):
    balance = "1,3,2" if n_stages == 3 else None
    return [run_steps(STEPS, watch=(SOURCE, HEAD), **MODEL, microbatches=m,
                      recompute=recompute, schedule=schedule, virtual_stages=v,
                      balance=balance if v == 1 else None)
            for m, recompute, schedule, v in _cases(n_stages)]


def _train(**values):
    return train.train(make_config(**dict(RESUME, **values)), logger=MetricsLogger([]))["losses"]


def _k2_worker(rank, world_size, ckpt):
    return _grid(2), _train(ckpt_dir=ckpt, ckpt_every=2)  # saves step-000002 and step-000003


def _k3_worker(rank, world_size, ckpt, resume):
    return _grid(3), _train(ckpt_dir=ckpt, resume=resume, balance="1,3,2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every pipeline run, in as few process groups as possible: K=1 here, K=2 (which also saves a
    checkpoint) in two processes, K=3 (which also resumes the K=2 checkpoint) in three."""
    root = tmp_path_factory.mktemp("tied")
    k2 = run_workers(_k2_worker, 2, str(root / "k2"), timeout_s=300)
    k3 = run_workers(_k3_worker, 3, str(root / "k3"), str(root / "k2" / "step-000002"), timeout_s=300)
    return {"grid": {1: [[r] for r in _grid(1)],
                     2: [[k2[r][0][i] for r in range(2)] for i in range(len(_cases(2)))],
                     3: [[k3[r][0][i] for r in range(3)] for i in range(len(_cases(3)))]},
            "losses": {2: k2[0][1], 3: k3[0][1],
                       1: _train(ckpt_dir=str(root / "k1"), resume=str(root / "k2" / "step-000002"))},
            "root": root}


@pytest.mark.parametrize("n_stages", [1, 2, 3])
def test_tied_pipeline_equals_a_single_device_model_with_one_shared_weight(n_stages, runs):
    reference = reference_steps(STEPS, **MODEL, microbatches=1)
    assert HEAD not in reference["grads"]  # one Parameter: clip_grad_norm_ counts it once
    for (m, recompute, schedule, v), stages in zip(_cases(n_stages), runs["grid"][n_stages]):
        what = f"tied {schedule} K={n_stages} V={v} M={m} recompute={recompute}"
        got = merge_stages(stages)
        head_grad = got["grads"].pop(HEAD, None)
        if n_stages > 1 and schedule != "zbv":  # two copies, each with the summed gradient
            assert torch.equal(head_grad, got["grads"][SOURCE]), what
        else:  # one stage holds both layers: one Parameter (the V puts both on stage 0)
            assert head_grad is None, what
        assert_close_tensors(got["grads"], reference["grads"], 1e-10, what + " first-step gradients")
        assert_close_tensors(got["weights"], reference["weights"], 1e-10, what + " weights")
        assert got["losses"] == pytest.approx(reference["losses"], rel=1e-10, abs=0), what
        for step in range(STEPS):
            copies = {n: t for s in stages for n, t in s["watched"][step].items()}
            assert torch.equal(copies[SOURCE], copies[HEAD]), f"{what}: step {step}"


def _stored(directory):
    tensors = {}
    for kind in ("model", "optimizer"):
        for file in sorted(directory.glob(f"{kind}-*.safetensors")):
            tensors.update(load_file(file))
    return tensors


def test_a_k2_checkpoint_stores_the_tied_weight_once_and_resumes_at_k1_and_k3(runs):
    root, losses = runs["root"], runs["losses"]
    k2 = _stored(root / "k2" / "step-000003")
    assert SOURCE in k2 and not any(n.startswith(HEAD) for n in k2)
    assert f"{SOURCE}.exp_avg" in k2
    # K=3 sums the same two copies as K=2: bitwise. K=1 shares one Parameter, whose gradient
    # autograd accumulates in another order (head + embedding per micro-batch): to 1e-12.
    assert losses[3] == [losses[2][2]]
    k3 = _stored(root / "k3" / "step-000003")
    assert set(k3) == set(k2) and all(torch.equal(k3[n], k2[n]) for n in k2)
    assert losses[1] == pytest.approx([losses[2][2]], rel=1e-12)
    assert_close_tensors(_stored(root / "k1" / "step-000003"), k2, 1e-12, "K=1 resumed from K=2")


def test_models_and_the_planner_count_the_tied_weight_once():
    cfg = make_config(**dict(MODEL, vocab=256))
    untied = make_config(**dict(MODEL, vocab=256, tie_embeddings=False))
    copy = cfg.vocab * cfg.d_model
    total = sum(sum(n) for n in layer_param_numels(cfg))
    assert total == sum(sum(n) for n in layer_param_numels(untied)) - copy
    layers = build_layers(cfg, range(6))
    assert layers[5].proj.weight is layers[0].tokens.weight  # one stage: plain sharing
    alone = build_layers(cfg, [5])[5]  # the last stage alone: an equal copy
    assert torch.equal(alone.proj.weight, layers[0].tokens.weight)
    assert sum(p.numel() for p in torch.nn.Sequential(*layers.values()).parameters()) == total
    for k in (1, 2):
        planned = plan.plan_run(cfg, k)
        held = sum(s.params for s in planned.stages)
        assert held == total + (copy if k > 1 else 0)  # K>1: the last stage holds a copy
        assert f"{total:,} parameters" in plan.format_plan(planned, None)
        logged = config_record(cfg, [6] if k == 1 else [3, 3], planned.spec)["plan"]["stage_params"]
        assert sum(logged) == held  # what a run logs per stage is what the stages hold
