"""Every schedule equals single-device training: gradients, losses and weights, float64, dropout on.

One grid per K in {1, 2, 3 uneven, 4}: family x schedule x M x recompute, all cases run inside
one set of K spawned processes. The V-placed schedules (zbv, dualpipev) run a subset of M
(_v_microbatches), every family and K where 2K chunks fit the model, both recompute modes. The reference is the plain loop of tests/harness.py."""
import pytest

from minipipe.build import build_run
from minipipe.config import make_config
from minipipe.schedule.actions import train_actions
from tests.harness import assert_close_tensors, merge_stages, reference_steps, run_steps
from tests.spawn import run_workers

MODELS = {
    "transformer": dict(model="transformer", layers=6, d_model=16, heads=2, max_seq_len=8,
                        data="synthetic"),  # 8 layers
    "amoebanet": dict(model="amoebanet", cells=1, filters=4, image_size=8, channels=3,
                      data="synthetic"),  # 7 layers
    # grouped-query attention (2 query heads per key/value head) and q/k/v biases
    "llama": dict(model="llama", layers=6, d_model=16, heads=4, kv_heads=2, ffn_dim=24, max_seq_len=8,
                  attention_bias=True, data="synthetic"),  # 8 layers
}
# BatchNorm on a micro-batch of one sample is degenerate (its variance is 0): AmoebaNet stops at
# M=4 of 8 samples; and 7 layers cannot be cut into K*V = 8 chunks, the Transformer covers that.
MICROBATCHES = {"transformer": (1, 2, 3, 4, 8), "amoebanet": (1, 2, 3, 4), "llama": (1, 2, 3, 4, 8)}
COMMON = dict(dtype="float64", batch_size=8, lr=1e-2, warmup=0)
GRID_DROPOUT = {"transformer": dict(dropout=0.1), "amoebanet": {}, "llama": dict(dropout=0.1)}  # the grid runs with dropout on
UNEVEN = {("transformer", 1): "1,4,3", ("amoebanet", 1): "3,1,3",  # K=3: layers per chunk
          ("transformer", 2): "1,2,1,2,1,1", ("amoebanet", 2): "2,1,1,1,1,1",
          ("llama", 1): "1,4,3", ("llama", 2): "1,2,1,2,1,1"}
STEPS = 3
N_LAYERS = {"transformer": 8, "amoebanet": 7, "llama": 8}


def _v_microbatches(schedule, n_stages, family):
    """zbv: M = 1, 2, 4, 8 (Llama, the third family: one M); dualpipev: M >= 2K, at 2K and 8
    (AmoebaNet's K=3 at 6 micro-batches of 2 samples: BatchNorm needs two)."""
    if schedule == "zbv":
        return (4,) if family == "llama" else tuple(m for m in (1, 2, 4, 8) if m in MICROBATCHES[family])
    if family == "amoebanet":
        return (2 * n_stages,) if n_stages <= 3 else ()
    return tuple(sorted({2 * n_stages, 8})) if family == "transformer" else (8,)


def _grid(n_stages, family):
    """(family, schedule, V, M, recompute) of every valid case of this family at this K."""
    cases = []
    for schedule, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb-h1", 1), ("zbv", 2), ("dualpipev", 2)):
        if v == 2 and N_LAYERS[family] < 2 * n_stages:
            continue
        v_shaped = schedule in ("zbv", "dualpipev")
        for m in _v_microbatches(schedule, n_stages, family) if v_shaped else MICROBATCHES[family]:
            if m == 3 and not (schedule == "interleaved" and n_stages == 3):
                continue  # M=3: only where interleaving needs a multiple of K=3
            if schedule == "interleaved" and m % n_stages:
                continue
            for recompute in ("always", "never"):
                cases.append((family, schedule, v, m, recompute))
    return cases


def _case(n_stages, family, schedule, v, m, recompute):
    balance = UNEVEN[family, v] if n_stages == 3 else None
    return dict(MODELS[family], **GRID_DROPOUT[family], **dict(COMMON, batch_size=_batch_size(m)),
                microbatches=m, recompute=recompute, balance=balance, schedule=schedule, virtual_stages=v)


def _batch_size(m):
    return 12 if m in (3, 6) else 8


def _grid_worker(rank, world_size, cases):
    return [run_steps(STEPS, **case) for case in cases]


@pytest.fixture(scope="module")
def references():
    """Single process, the same micro-batching (dropout masks and BatchNorm statistics are per
    micro-batch, so M is part of the math), computed once per (family, M)."""
    return {}


def _reference(references, family, m):
    if (family, m) not in references:
        case = dict(MODELS[family], **GRID_DROPOUT[family], **dict(COMMON, batch_size=_batch_size(m)),
                    microbatches=m)
        references[family, m] = reference_steps(STEPS, **case)
    return references[family, m]


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("n_stages", [1, 2, 3, 4])
def test_every_schedule_equals_single_device(n_stages, family, references):
    grid = _grid(n_stages, family)
    cases = [_case(n_stages, *case) for case in grid]
    if n_stages == 1:
        results = [[run_steps(STEPS, **case)] for case in cases]
    else:
        per_rank = run_workers(_grid_worker, n_stages, cases, timeout_s=600)
        results = [[per_rank[r][i] for r in range(n_stages)] for i in range(len(cases))]
    for (family, schedule, v, m, recompute), stages in zip(grid, results):
        got, ref = merge_stages(stages), _reference(references, family, m)
        what = f"{family} {schedule} V={v} K={n_stages} M={m} recompute={recompute}"
        assert_close_tensors(got["grads"], ref["grads"], 1e-10, what + " first-step gradients")
        assert_close_tensors(got["weights"], ref["weights"], 1e-10, what + f" weights after {STEPS} steps")
        for a, b in zip(got["losses"], ref["losses"]):
            assert abs(a - b) <= 1e-10 * abs(b), f"{what}: losses {got['losses']} != {ref['losses']}"
        for result in stages:  # the engine ran exactly the schedule's list, and expected no more
            listed = train_actions(schedule, result["stage"], n_stages, m, v)
            assert result["executed"] == [str(a) for a in listed], what
            assert result["headers_left"] == 0, what


DROPOUT = dict(MODELS["transformer"], **COMMON, dropout=0.2, microbatches=2)


def _dropout_worker(rank, world_size):
    return [run_steps(2, **DROPOUT, recompute=mode) for mode in ("always", "except_last", "never")]


def test_dropout_masks_are_the_same_for_any_stage_count_and_recompute_mode():
    reference = run_steps(2, **DROPOUT, recompute="never")
    no_dropout = run_steps(2, **dict(DROPOUT, dropout=0.0), recompute="never")
    assert abs(reference["losses"][0] - no_dropout["losses"][0]) > 1e-3  # dropout is really on
    per_rank = run_workers(_dropout_worker, 2)
    for i, mode in enumerate(("always", "except_last", "never")):
        got = merge_stages([per_rank[0][i], per_rank[1][i]])
        assert_close_tensors(got["grads"], reference["grads"], 1e-10, f"dropout K=2 {mode}")
        assert_close_tensors(got["weights"], reference["weights"], 1e-10, f"dropout K=2 {mode}")


def _dp_worker(rank, world_size, case):
    from minipipe.pipeline import engine
    engine.BUCKET_BYTES = 1024  # several gradient buckets per stage: the bucketed path is compared
    return run_steps(2, **case, dp=2, stages=2)


@pytest.mark.parametrize("family", ["transformer", "amoebanet", "llama"])
def test_data_parallel_pipeline_equals_single_process(family):
    """dp=2 x stages=2. Replica d's micro-batch m holds the rows of the single process's
    micro-batch d*M + m, so the reference for BatchNorm models uses dp*M micro-batches."""
    case = dict(MODELS[family], **COMMON, microbatches=2)
    ref_m = 4 if family == "amoebanet" else 1
    reference = reference_steps(2, **dict(case, microbatches=ref_m))
    per_rank = run_workers(_dp_worker, 4, case, timeout_s=180)
    for replica in (0, 1):
        got = merge_stages(per_rank[2 * replica: 2 * replica + 2])
        assert_close_tensors(got["grads"], reference["grads"], 1e-10, f"dp replica {replica} gradients")
        params = {n: t for n, t in got["weights"].items() if "running" not in n}
        ref_params = {n: t for n, t in reference["weights"].items() if "running" not in n}
        assert_close_tensors(params, ref_params, 1e-10, f"dp replica {replica} weights")
        assert got["losses"] == pytest.approx(reference["losses"], rel=1e-10)


def _balance_worker(rank, world_size, family, by):
    cfg = make_config(**MODELS[family], batch_size=8, balance_by=by)
    return build_run(cfg).balance


@pytest.mark.parametrize("family", ["transformer", "llama"])
@pytest.mark.parametrize("by", ["time", "memory"])
def test_profiled_balance_is_one_cut_shared_by_every_rank(family, by):
    balances = run_workers(_balance_worker, 2, family, by)
    assert balances[0] == balances[1] and sum(balances[0]) == 8 and min(balances[0]) >= 1


BN = dict(MODELS["amoebanet"], **COMMON, microbatches=4)


def _deferred_bn_worker(rank, world_size, deferred):
    return run_steps(1, **BN, deferred_bn=deferred)


def test_deferred_batchnorm_tracks_the_whole_minibatch():
    """The stem's BatchNorm sees the same inputs in every layout, so with --deferred-bn its
    running statistics equal single-device full-batch training; per micro-batch they do not."""
    full = reference_steps(1, **dict(BN, microbatches=1))
    stats = ("layers.0.bn.running_mean", "layers.0.bn.running_var")
    deferred = merge_stages(run_workers(_deferred_bn_worker, 2, True))["weights"]
    per_micro = merge_stages(run_workers(_deferred_bn_worker, 2, False))["weights"]
    for name in stats:
        assert_close_tensors({name: deferred[name]}, {name: full["weights"][name]}, 1e-12, "deferred")
        err = (per_micro[name] - full["weights"][name]).norm() / full["weights"][name].norm()
        assert err > 1e-6, f"{name}: per-micro-batch tracking should differ from full-batch"


@pytest.mark.parametrize("schedule", ["gpipe", "zbv"])
def test_data_parallel_dropout_draws_the_masks_of_the_global_microbatch(schedule):
    """dp=2 x M=2 is the same computation as one process with M=4, dropout included; under zbv
    each replica's two stages hold the V (peers, the loss on stage 0, in this replica's ranks)."""
    case = dict(MODELS["transformer"], **COMMON, dropout=0.2)
    single = run_steps(2, **case, microbatches=4)
    per_rank = run_workers(_dp_worker, 4, dict(case, microbatches=2, schedule=schedule), timeout_s=180)
    for replica in (0, 1):
        got = merge_stages(per_rank[2 * replica: 2 * replica + 2])
        assert_close_tensors(got["grads"], single["grads"], 1e-10, f"dp replica {replica} gradients")
        assert_close_tensors(got["weights"], single["weights"], 1e-10, f"dp replica {replica} weights")


def _generate_worker(rank, world_size, family):
    """Per schedule: the tokens sampled from a prompt and the validation loss of two batches."""
    outputs = {}
    for schedule, v in (("gpipe", 1), ("interleaved", 2), ("zbv", 2)):
        run = build_run(make_config(**MODELS[family], **COMMON, microbatches=2, schedule=schedule,
                                    virtual_stages=v))
        prompt = run.dataset.batch(0, 1)[0][:, :4]
        outputs[schedule] = (run.engine.generate(prompt, 6, MODELS[family]["max_seq_len"], seed=3).tolist(),
                             run.engine.evaluate([run.dataset.batch(i, 8) for i in (1, 2)]))
    return outputs


@pytest.mark.parametrize("family", ["transformer", "llama"])
def test_generation_and_evaluation_through_any_chunking_equal_one_process(family):
    """K=2 under gpipe, interleaved (chunks 0..3 over two ranks, the last rank feeding rank 0) and
    zbv (the V: rank 1 runs chunks 1 and 2 back to back, rank 0 samples and holds the loss) sample
    the tokens and compute the validation loss one process does with the whole model."""
    run = build_run(make_config(**MODELS[family], **COMMON, microbatches=2))
    prompt = run.dataset.batch(0, 1)[0][:, :4]
    single = (run.engine.generate(prompt, 6, MODELS[family]["max_seq_len"], seed=3).tolist(),
              run.engine.evaluate([run.dataset.batch(i, 8) for i in (1, 2)]))
    for rank, outputs in enumerate(run_workers(_generate_worker, 2, family)):
        for schedule, (tokens, val_loss) in outputs.items():
            assert tokens == single[0] and val_loss == pytest.approx(single[1], rel=1e-12), (rank, schedule)
