"""The pipeline timeline: a real 2-stage torchrun job writes a valid Chrome trace and PNG whose
spans follow the schedule, and the measured bubble agrees with GPipe's formula on ideal ticks."""
import json

from minipipe.schedule import ACTION_KINDS, bubble_fraction, gpipe_actions
from minipipe.timeline import measured_bubble
from tests.spawn import run_torchrun

K, M, STEPS = 2, 4, 3
ARGS = ["--layers", "2", "--d-model", "32", "--heads", "2", "--seq-len", "32", "--data", "synthetic",
        "--batch-size", "8", "--microbatches", str(M), "--steps", str(STEPS), "--log-every", "2",
        "--eval-every", "0", "--eval-batches", "1", "--wandb", "disabled"]


def test_measured_bubble_of_ideal_ticks_equals_the_gpipe_formula():
    for k, m in ((1, 4), (2, 4), (4, 8), (3, 1)):
        extents = []
        for s in range(k):  # render_grid's clocks: F(m) at s + m, B(m) at (M+K-1) + (K-1-s) + (M-1-m)
            starts = [s + i for i in range(m)] + [(m + k - 1) + (k - 1 - s) + i for i in range(m)]
            extents.append((min(starts), max(starts) + 1, 2 * m))
        assert abs(measured_bubble(extents) - bubble_fraction(k, m)) < 1e-12


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
    assert all(e["dur"] >= 0 and e["args"]["step"] == 1 for e in spans)  # closed; --trace-steps 1
    for stage in range(K):
        own = [e for e in spans if e["tid"] == stage]
        actions = [e for e in own if e["cat"] in ACTION_KINDS]
        assert [(e["cat"], e["args"]["microbatch"]) for e in actions] == [
            (a.kind, a.microbatch) for a in gpipe_actions(stage, K, M)]
        for before, after in zip(actions, actions[1:]):  # one rank runs one action at a time
            assert before["ts"] + before["dur"] <= after["ts"] + 1e-3
        backward = {e["args"]["microbatch"]: e for e in actions if e["cat"] == "backward"}
        for e in own:
            if e["cat"] == "recompute":  # nested inside the backward of its micro-batch
                outer = backward[e["args"]["microbatch"]]
                assert outer["ts"] - 1e-3 <= e["ts"] and e["ts"] + e["dur"] <= outer["ts"] + outer["dur"] + 1e-3
    sends = {e["args"]["microbatch"]: e for e in spans if e["cat"] == "send_act"}
    for e in spans:  # aligned clocks: no activation arrives before it is sent (50 ms slack)
        if e["cat"] == "recv_act":
            assert e["ts"] + e["dur"] >= sends[e["args"]["microbatch"]]["ts"] - 50e3

    png = trace.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(STEPS))  # one line per step
    for row in rows:
        assert all(isinstance(row[k], float) for k in ("loss", "lr", "grad_norm", "step_time_s",
                                                       "tokens_per_s"))
    for row in (rows[1], rows[2]):  # --log-every 2 and the last step: every stage's numbers
        assert 0.0 <= row["bubble_measured"] <= 1.0
        assert row["bubble_theory"] == bubble_fraction(K, M)
        assert row["peak_mem_gib/stage0"] > 0 and row["peak_mem_gib/stage1"] > 0
        assert isinstance(row["tflops_per_device"], float)
