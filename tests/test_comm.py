import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from minipipe.dist import init_process_groups
from minipipe.pipeline.comm import StageComm
from tests.spawn import REPO_ROOT, run_workers


def two_stage_comm(rank, timeout_s):
    layout = init_process_groups(n_stages=2, dp=1, timeout_s=30)
    return StageComm(rank, layout.prev_rank, layout.next_rank, layout.stage, layout.device, timeout_s,
                     layout.p2p)


def messages():
    """Activations as a pipeline produces them: odd shapes, every wire dtype, a smaller last micro-batch."""
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randn(4, 3, 5, generator=gen),
        (torch.randn(4, 7, generator=gen, dtype=torch.float64),),  # a 1-tuple stays a 1-tuple
        (torch.randn(4, 2, generator=gen).to(torch.bfloat16), torch.randn(4, generator=gen).half(),
         torch.randint(0, 100, (4, 9), generator=gen), torch.randint(0, 100, (4,), generator=gen).int(),
         torch.rand(4, 9, generator=gen) > 0.5, torch.randint(0, 255, (4, 1, 1, 2), generator=gen).to(torch.uint8)),
        (torch.randn(3, 5, generator=gen), torch.zeros(3, 0, dtype=torch.int64)),  # smaller last micro-batch
        torch.tensor(2.5),  # a scalar
    ]


def roundtrip_worker(rank, world_size):
    comm = two_stage_comm(rank, timeout_s=10)
    if rank == 0:
        for m, value in enumerate(messages()):
            comm.send(value, dst=1, what=f"activation of micro-batch {m}")
        comm.wait_sends()
        grads = [comm.recv(1, f"gradient of micro-batch {m}", m, expect_like=value)
                 for m, value in reversed(list(enumerate(messages())))]
        return grads[::-1]
    received = []
    for m, expected in enumerate(messages()):
        batch = expected.shape[0] if torch.is_tensor(expected) and expected.dim() else None
        received.append(comm.recv(0, f"activation of micro-batch {m}", m, expect_batch=batch))
    for m in reversed(range(len(received))):
        comm.send(received[m], dst=0, what=f"gradient of micro-batch {m}")
    comm.wait_sends()
    return received


def assert_same(got, expected):
    assert type(got) is type(expected)
    for g, e in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,)):
        assert g.dtype == e.dtype and g.shape == e.shape and torch.equal(g, e)


def test_tensors_and_tuples_roundtrip_with_structure_dtype_and_shape():
    grads_back, received = run_workers(roundtrip_worker, 2, timeout_s=60)
    for got, back, expected in zip(received, grads_back, messages()):
        assert_same(got, expected)
        assert_same(back, expected)


def mismatch_worker(rank, world_size):
    comm = two_stage_comm(rank, timeout_s=10)
    like = (torch.zeros(4, 8), torch.zeros(4, dtype=torch.int64))
    wrong = [(torch.zeros(4, 8), torch.zeros(4, dtype=torch.int32)),  # dtype
             (torch.zeros(4, 9), torch.zeros(4, dtype=torch.int64)),  # shape
             torch.zeros(4, 8),  # structure
             (torch.zeros(3, 8), torch.zeros(3, dtype=torch.int64))]  # batch
    if rank == 1:
        for m, value in enumerate(wrong):
            comm.send(value, dst=0, what=f"gradient of micro-batch {m}")
        comm.wait_sends()
        return None
    errors = []
    for m in range(len(wrong)):
        try:
            if m < 3:
                comm.recv(1, f"gradient of micro-batch {m} from stage 1", m, expect_like=like)
            else:
                comm.recv(1, f"activation of micro-batch {m} from stage 1", m, expect_batch=4)
        except Exception as exc:
            errors.append((type(exc).__name__, str(exc)))
    return errors


def test_mismatched_value_raises_pipeline_error_naming_rank_stage_microbatch():
    errors = run_workers(mismatch_worker, 2, timeout_s=60)[0]
    assert [e[0] for e in errors] == ["PipelineError"] * 4
    dtype, shape, structure, batch = (e[1] for e in errors)
    assert dtype.startswith("rank 0 (stage 0, micro-batch 0): gradient of micro-batch 0 from stage 1: expected")
    assert "a tuple of 2 (float32[4, 8], int64[4])" in dtype and "(float32[4, 8], int32[4])" in dtype
    assert "received a tuple of 2 (float32[4, 9], int64[4])" in shape
    assert "received a Tensor (float32[4, 8])" in structure
    assert "micro-batch 3" in batch and "expected dim 0 = 4" in batch and "float32[3, 8]" in batch


def silent_peer_worker(rank, world_size, timeout_s):
    comm = two_stage_comm(rank, timeout_s=timeout_s)
    if rank == 0:
        time.sleep(timeout_s + 2)  # alive but never sends: the receiver must give up by itself
        return None
    start = time.monotonic()
    try:
        comm.recv(0, "activation of micro-batch 3 from stage 0", 3)
    except Exception as exc:
        return type(exc).__name__, str(exc), time.monotonic() - start
    return "no error"


def test_peer_that_never_sends_times_out_with_pipeline_error():
    error, message, waited = run_workers(silent_peer_worker, 2, 3.0, timeout_s=60)[1]
    assert error == "PipelineError"
    assert message.startswith("rank 1 (stage 1, micro-batch 3): timed out after 3 s receiving "
                              "activation of micro-batch 3 from stage 0")
    assert "check its log" in message and "--timeout" in message
    assert 2.5 < waited < 8


def dying_peer_worker(rank, world_size):
    comm = two_stage_comm(rank, timeout_s=20)
    dist.barrier()
    if rank == 0:
        time.sleep(0.5)
        os._exit(1)
    comm.recv(0, "activation of micro-batch 2 from stage 0", 2)


def test_dead_peer_raises_pipeline_error_not_a_hang():
    start = time.monotonic()
    dead, survivor = run_workers(dying_peer_worker, 2, timeout_s=60, expect_failure=True)
    assert dead.error == "Died" and "code 1" in dead.message
    assert survivor.error == "PipelineError"
    assert survivor.message.startswith("rank 1 (stage 1, micro-batch 2): lost the connection (the peer "
                                       "process exited or crashed) receiving activation of micro-batch 2 "
                                       "from stage 0")
    assert time.monotonic() - start < 20  # well under the 20 s timeout: gloo notices the closed socket


def layout_worker(rank, world_size):
    layout = init_process_groups(n_stages=2, dp=2, timeout_s=30)
    stage_sum = torch.tensor([float(rank)])
    dist.all_reduce(stage_sum, group=layout.stage_group)
    pipeline_sum = torch.tensor([float(rank)])
    dist.all_reduce(pipeline_sum, group=layout.pipeline_group)
    p2p = layout.p2p  # every point-to-point group spans this replica's pipeline, headers on gloo
    p2p_groups = [p2p.headers, *p2p.lanes]
    assert len(set(map(id, p2p_groups))) == 5 and p2p.backend == "gloo" == dist.get_backend(p2p.headers)
    assert all(dist.get_process_group_ranks(g) == dist.get_process_group_ranks(layout.pipeline_group)
               for g in p2p_groups)
    return (layout.rank, layout.stage, layout.dp_rank, layout.prev_rank, layout.next_rank,
            dist.get_process_group_ranks(layout.stage_group),
            dist.get_process_group_ranks(layout.pipeline_group),
            stage_sum.item(), pipeline_sum.item(), str(layout.device))


def test_layout_dp2_x_stages2_puts_pipeline_neighbours_adjacent():
    layouts = run_workers(layout_worker, 4, timeout_s=90)
    assert layouts == [
        (0, 0, 0, None, 1, [0, 2], [0, 1], 2.0, 1.0, "cpu"),
        (1, 1, 0, 0, None, [1, 3], [0, 1], 4.0, 1.0, "cpu"),
        (2, 0, 1, None, 3, [0, 2], [2, 3], 2.0, 5.0, "cpu"),
        (3, 1, 1, 2, None, [1, 3], [2, 3], 4.0, 5.0, "cpu"),
    ]


def wrong_world_worker(rank, world_size):
    init_process_groups(n_stages=3, dp=1, timeout_s=10)


def test_world_size_mismatch_is_a_config_error():
    outcomes = run_workers(wrong_world_worker, 2, timeout_s=60, expect_failure=True)
    for outcome in outcomes:
        assert outcome.error == "ConfigError"
        assert "world size 2 != dp 1 x stages 3 = 3" in outcome.message and "--stages" in outcome.message


ONE_RANK = """
import torch, torch.distributed as dist
from minipipe.dist import init_process_groups
layout = init_process_groups(n_stages=1, dp=1, timeout_s=10)
assert (layout.rank, layout.stage, layout.prev_rank, layout.next_rank, layout.p2p) == (0, 0, None, None, None)
value = torch.ones(1)
dist.all_reduce(value, group=layout.stage_group)
assert value.item() == 1.0
dist.destroy_process_group()
print("ok")
"""


def test_single_process_gets_a_one_rank_group_without_a_launcher():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-c", ONE_RANK], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
