"""The pipeline timeline: a real 2-stage interleaved torchrun job writes a valid Chrome trace and
PNG whose spans follow the schedule, chunks named, and the measured bubble agrees with each
schedule's formula on the checker's ideal ticks."""
import json

from minipipe.schedule.actions import Kind, bubble_fraction, train_actions
from minipipe.schedule.check import check, theory_bubble
from minipipe.tracking.timeline import measured_bubble
from tests.spawn import run_torchrun

K, M, V, STEPS = 2, 4, 2, 3
ACTION_KINDS = {kind.value for kind in Kind}
ARGS = ["--schedule", "interleaved", "--virtual-stages", str(V), "--layers", "2", "--d-model", "32", "--heads", "2", "--seq-len", "32", "--data", "synthetic",
        "--batch-size", "8", "--microbatches", str(M), "--steps", str(STEPS), "--log-every", "2",
        "--eval-every", "0", "--eval-batches", "1", "--wandb", "disabled"]


def test_measured_bubble_of_ideal_ticks_equals_each_schedule_formula():
    for schedule, k, m, v in (("gpipe", 1, 4, 1), ("gpipe", 4, 8, 1), ("1f1b", 3, 1, 1), ("1f1b", 4, 8, 1),
                              ("interleaved", 2, 4, 2), ("interleaved", 4, 8, 3), ("zb-h1", 4, 8, 1),
                              ("zbv", 4, 8, 2), ("zbv", 3, 2, 2)):
        extents = []
        for starts in check(schedule, k, m, v).starts:  # unit ticks of the schedule simulation
            extents.append((min(starts.values()), max(starts.values()) + 1, len(starts)))
        assert abs(measured_bubble(extents) - theory_bubble(schedule, k, m, v)) < 1e-12, (schedule, k, m, v)
        if schedule in ("gpipe", "1f1b", "interleaved"):
            assert theory_bubble(schedule, k, m, v) == bubble_fraction(k, m, v)


def test_two_stage_trace_is_valid_and_follows_the_schedule(tmp_path):
    trace, jsonl = tmp_path / "trace.json", tmp_path / "metrics.jsonl"
    done = run_torchrun(["train.py", *ARGS, "--trace", str(trace), "--metrics-jsonl", str(jsonl),
                         "--out-dir", str(tmp_path)], nproc=K, timeout_s=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bubble measured" in done.stdout

    events = json.loads(trace.read_text())["traceEvents"]
    rows = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert rows == {0: "stage 0 (rank 0)", 1: "stage 1 (rank 1)"}  # one row per stage
    spans = [e for e in events if e["ph"] == "X"]
    assert all(e["dur"] >= 0 and e["args"]["step"] == 2 for e in spans)  # closed; --trace-steps 2
    for stage in range(K):
        own = [e for e in spans if e["tid"] == stage]
        actions = [e for e in own if e["cat"] in ACTION_KINDS]
        assert [(e["cat"], e["args"]["microbatch"], e["args"]["chunk"]) for e in actions] == [
            (a.kind.value, a.microbatch, a.chunk if a.rank_chunks > 1 else None)  # a span names a chunk under V > 1
            for a in train_actions("interleaved", stage, K, M, V)]
        for before, after in zip(actions, actions[1:]):  # one rank runs one action at a time
            assert before["ts"] + before["dur"] <= after["ts"] + 1e-3
        backward = {(e["args"]["microbatch"], e["args"]["chunk"]): e for e in actions if e["cat"] == "backward"}
        assert {e["name"] for e in actions if e["cat"] == "forward"} >= {"forward 0c0", "forward 0c1"}
        for e in own:
            if e["cat"] == "recompute":  # nested inside the backward of its micro-batch and chunk
                outer = backward[e["args"]["microbatch"], e["args"]["chunk"]]
                assert outer["ts"] - 1e-3 <= e["ts"] and e["ts"] + e["dur"] <= outer["ts"] + outer["dur"] + 1e-3
    sends = {(e["tid"], e["args"]["microbatch"], e["args"]["chunk"]): e for e in spans if e["cat"] == "send_act"}
    for e in spans:  # aligned clocks: no activation arrives before it is sent (50 ms slack)
        if e["cat"] == "recv_act":  # chunk c of rank r comes from rank r-1 mod K (chunk - 1 on rank K-1 -> 0)
            m, chunk = e["args"]["microbatch"], e["args"]["chunk"]
            sender = sends[(e["tid"] - 1) % K, m, chunk - (e["tid"] == 0)]
            assert e["ts"] + e["dur"] >= sender["ts"] - 50e3

    png = trace.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # one line per step, from 1
    for row in rows:
        assert all(isinstance(row[k], float) for k in ("loss", "lr", "grad_norm", "step_time_s",
                                                       "tokens_per_s"))
    for row in (rows[1], rows[2]):  # --log-every 2 and the last step: every stage's numbers
        assert 0.0 <= row["bubble_measured"] <= 1.0
        assert row["bubble_theory"] == bubble_fraction(K, M, V) == 1 / 9
        assert row["peak_mem_gib/stage0"] > 0 and row["peak_mem_gib/stage1"] > 0
        assert isinstance(row["tflops_per_device"], float)


def test_zb_h1_trace_shows_input_and_weight_gradient_spans(tmp_path):
    """Split backwards appear as their own spans, in the schedule's order, the recompute nested
    in its I; the measured bubble is checked against the simulation at F = I = W."""
    trace = tmp_path / "trace.json"
    args = ARGS[4:]  # without the interleaved schedule and its V
    done = run_torchrun(["train.py", *args, "--schedule", "zb-h1", "--trace", str(trace),
                         "--out-dir", str(tmp_path)], nproc=K, timeout_s=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "vs at F = I = W (simulated) = 0.077" in done.stdout  # K=2, M=4: 1 tick of 13
    spans = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    for stage in range(K):
        own = [e for e in spans if e["tid"] == stage]
        actions = [(e["cat"], e["args"]["microbatch"]) for e in own if e["cat"] in ACTION_KINDS]
        assert actions == [(a.kind.value, a.microbatch) for a in train_actions("zb-h1", stage, K, M)]
        assert {e["name"] for e in own} >= {"input grad (I) 0", "weight grad (W) 3"}
        inputs = {e["args"]["microbatch"]: e for e in own if e["cat"] == "backward_input"}
        for e in own:
            if e["cat"] == "recompute":
                outer = inputs[e["args"]["microbatch"]]
                assert outer["ts"] - 1e-3 <= e["ts"] and e["ts"] + e["dur"] <= outer["ts"] + outer["dur"] + 1e-3
    assert trace.with_suffix(".png").read_bytes().startswith(b"\x89PNG")


def test_zbv_trace_names_each_stages_two_chunks_and_follows_the_v(tmp_path):
    """Under the V each stage's spans name its local chunk (stage 0: c0 is model chunk 0, c1 the
    last one) in the schedule's order; the measured bubble line quotes the V's formula."""
    trace = tmp_path / "trace.json"
    done = run_torchrun(["train.py", *ARGS[4:], "--schedule", "zbv", "--trace", str(trace),
                         "--out-dir", str(tmp_path)], nproc=K, timeout_s=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "vs at F = I = W (K-1)/(6M+K-1) = 1/25 = 0.040" in done.stdout
    spans = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    for stage in range(K):
        own = [e for e in spans if e["tid"] == stage]
        actions = [(e["cat"], e["args"]["microbatch"]) for e in own if e["cat"] in ACTION_KINDS]
        assert actions == [(a.kind.value, a.microbatch) for a in train_actions("zbv", stage, K, M, 2)]
        assert {e["name"] for e in own} >= {"input grad (I) 0c1", "weight grad (W) 3c0"}
