"""Every bad input is refused before any training step with exit code 2 and one `minipipe error:`
line that names what is wrong and what to do, and the user's files are left as they were.
Each case runs train.main in this process (the `cli` fixture of conftest.py)."""
import hashlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from minipipe import data
from minipipe.kernels import runtime


def _tree(root) -> dict:
    """path -> sha256 of every file under root: what 'left as it was' compares."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def refused(result, *needles) -> str:
    code, line, _ = result
    assert code == 2 and line.startswith("minipipe error: "), result
    for needle in needles:
        assert needle in line, (needle, line)
    return line


@pytest.mark.parametrize("flags,needles", [
    (["--layers", "0"], ["--layers must be >= 1"]),
    (["--layers", "-1"], ["--layers must be >= 1"]),
    (["--stages", "0"], ["--stages must be >= 1"]),
    (["--heads", "0"], ["--heads must be >= 1"]),
    (["--d-model", "0"], ["--d-model must be >= 1"]),
    (["--d-model", "30", "--heads", "4"], ["--d-model 30 is not divisible by --heads 4"]),
    (["--lr", "nan"], ["--lr must be a finite number"]),
    (["--grad-clip", "nan"], ["--grad-clip must be a finite number"]),
    (["--beta2", "1.5"], ["--beta2 must be in [0, 1)"]),
    (["--steps", "0", "--sample", "5"], ["--sample", "--steps 0 trains nothing"]),
    (["--balance", "2,x"], ["--balance '2,x'", "e.g. 3,3,2"]),
])
def test_bad_flags(cli, flags, needles):
    refused(cli(*flags), *needles)


@pytest.mark.parametrize("toml,needles", [
    ('layers = "four"', ["run.toml: layers = 'four': expected an integer"]),
    ("steps = 2.5", ["run.toml: steps = 2.5: expected an integer"]),
    ('deferred_bn = "false"', ["run.toml: deferred_bn = 'false': expected true or false"]),
    ("balance = [2, 2]", ["--balance 2,2 has 2 entries but --stages is 1"]),  # a list is read
])
def test_toml_values_of_the_wrong_type(cli, tmp_path, toml, needles):
    path = tmp_path / "run.toml"
    path.write_text(toml + "\n")
    refused(cli("--config", path), *needles)


def test_a_config_error_before_the_process_group_names_the_launchers_rank(cli, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    refused(cli("--layers", "0"), "(rank 1) --layers must be >= 1")


@pytest.mark.parametrize("mode", ["", "bogus"])
def test_a_wandb_mode_wandb_would_choke_on(cli, monkeypatch, mode):
    monkeypatch.setenv("WANDB_MODE", mode)
    refused(cli(), f"WANDB_MODE={mode!r} is not a wandb mode", "online, offline, disabled")


def test_triton_kernels_without_triton(cli, monkeypatch):
    monkeypatch.setattr(runtime, "HAVE_TRITON", False)
    refused(cli("--kernels", "triton"), "--kernels triton: the triton backend needs the triton package", "--kernels torch")


@pytest.mark.parametrize("flag", ["--out-dir", "--metrics-jsonl", "--trace", "--ckpt-dir",
                                  "MINIPIPE_CACHE"])
def test_an_unwritable_output_path_is_refused_at_start(cli, tmp_path, monkeypatch, flag):
    blocker = tmp_path / "a-file"  # as root, permissions do not stop a write; a file in the path does
    blocker.write_text("mine\n")
    target = blocker / "sub"
    if flag == "MINIPIPE_CACHE":
        monkeypatch.setenv("MINIPIPE_CACHE", str(target))
        result = cli("--data", "stdlib")
    else:
        extra = ["--wandb", "offline"] if flag == "--out-dir" else []
        result = cli(flag, target, *extra)
    refused(result, str(target))
    assert _tree(tmp_path) == {"a-file": hashlib.sha256(b"mine\n").hexdigest()}


def test_a_ckpt_dir_that_is_a_file(cli, tmp_path):
    (tmp_path / "ckpt").write_text("mine\n")
    refused(cli("--ckpt-dir", tmp_path / "ckpt"), "is a file, not a directory")
    assert (tmp_path / "ckpt").read_text() == "mine\n"


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case,needles", [
    ("train.bin without val.bin", ["holds nanoGPT token files but not", "val.bin"]),
    ("odd-length .bin", ["not a whole number of uint16 token ids"]),
    ("ids over --vocab", ["holds token id 300, which is >= --vocab 100"]),
    ("1-sample npz", ["1 sample(s)", "at least 2 samples"]),
    ("object-array npz", ["not a readable .npz"]),
    ("non-zip npz", ["not an .npz (zip) archive"]),
    ("npy named npz", ["not an .npz (zip) archive"]),
    ("negative labels", ["labels span -1..1", "class ids must lie in 0..1"]),
    ("float labels", ["y integer class ids", "float"]),
    ("NaN images", ["NaN or infinite"]),
])
def test_bad_data(cli, tmp_path, case, needles):
    ids = np.arange(400, dtype=np.uint16) % 301
    images = np.random.default_rng(0).normal(size=(40, 1, 8, 8)).astype(np.float32)
    labels = np.arange(40) % 3
    if case == "train.bin without val.bin":
        (tmp_path / "tokens").mkdir()
        ids.tofile(tmp_path / "tokens" / "train.bin")
        source, model = tmp_path / "tokens", []
    elif case in ("odd-length .bin", "ids over --vocab"):
        source, model = tmp_path / "ids.bin", []
        source.write_bytes(ids.tobytes() + (b"\0" if case == "odd-length .bin" else b""))
    else:
        source, model = tmp_path / "images.npz", ["--model", "amoebanet", "--image-size", "8"]
        if case == "1-sample npz":
            _npz(source, x=images[:1], y=labels[:1])
        elif case == "object-array npz":
            _npz(source, x=np.array([images[0], "text"], dtype=object), y=labels)
        elif case == "non-zip npz":
            source.write_text("not a zip\n")
        elif case == "npy named npz":
            np.save(tmp_path / "images.npy", images)
            (tmp_path / "images.npy").rename(source)
        elif case == "negative labels":
            _npz(source, x=images, y=labels - 1)
        elif case == "float labels":
            _npz(source, x=images, y=labels + 0.5)
        else:
            images[3, 0, 2, 2] = np.nan
            _npz(source, x=images, y=labels)
    before = _tree(tmp_path)
    refused(cli(*model, "--data", source, "--vocab", "100"), *needles)
    assert _tree(tmp_path) == before


def test_a_full_disk_while_caching_the_corpus_leaves_no_partial_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIPIPE_CACHE", str(tmp_path))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit: EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        with pytest.raises(data.DataError, match="caching the stdlib corpus .* failed"):
            data._stdlib_corpus()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert list(tmp_path.iterdir()) == []


def test_the_cli_exits_2_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, "train.py", "--layers", "0"], capture_output=True,
                          text=True, timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 2
    assert done.stderr.strip() == "minipipe error: --layers must be >= 1 (got 0)"


# ---- nothing of the user's is lost or deleted in --ckpt-dir --------------------------------
def test_keep_prunes_only_checkpoints_and_a_fresh_run_never_mixes_with_them(cli, tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "step-7").mkdir(parents=True)
    (ckpt / "step-7" / "notes.txt").write_text("mine\n")
    (ckpt / "step-1").write_text("also mine\n")
    assert cli("--ckpt-dir", ckpt, "--steps", 3, "--ckpt-every", 1, "--keep", 1)[0] == 0
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-000003", "step-1", "step-7"]
    (ckpt / "step-000003" / "notes.txt").write_text("mine too\n")  # now not ours alone
    code, _, err = cli("--ckpt-dir", ckpt, "--steps", 4, "--keep", 1)
    assert code == 0 and "--keep 1 leaves" in err
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-000003", "step-000004",
                                                      "step-1", "step-7"]
    before = _tree(tmp_path)
    refused(cli("--ckpt-dir", ckpt, "--resume", "none"), "holds checkpoints of another run",
            "step-000004", "--overwrite-ckpt")
    assert _tree(tmp_path) == before
    assert cli("--ckpt-dir", ckpt, "--resume", "none", "--overwrite-ckpt", "--steps", 1)[0] == 0
    assert (ckpt / "step-7" / "notes.txt").read_text() == "mine\n"


def test_a_second_run_on_the_same_ckpt_dir_is_refused_and_a_dead_ones_lock_taken_over(cli, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    lock = ckpt / "minipipe.lock"
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": "now", "token": "t"}
    lock.write_text(json.dumps(holder))  # this test process: alive
    refused(cli("--ckpt-dir", ckpt), "is in use by another run", f"pid {os.getpid()}",
            f"delete {lock}")
    assert json.loads(lock.read_text()) == holder and [p.name for p in ckpt.iterdir()] == [lock.name]
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is now free (reuse within this test is vanishingly unlikely)
    lock.write_text(json.dumps({**holder, "pid": dead.pid}))
    code, _, err = cli("--ckpt-dir", ckpt)
    assert code == 0 and f"left by pid {dead.pid}, which is no longer running" in err, err
    assert not lock.exists()  # released at the end of the run


@pytest.mark.parametrize("flag,value", [("--seed", 7), ("--batch-size", 16)])
def test_resuming_with_another_data_order_is_refused(cli, tmp_path, flag, value):
    ckpt = tmp_path / "ckpt"
    assert cli("--ckpt-dir", ckpt)[0] == 0
    before = _tree(tmp_path)
    original = {"--seed": 1337, "--batch-size": 8}[flag]
    refused(cli("--ckpt-dir", ckpt, "--steps", 4, flag, value),
            f"{flag} {original} (this run: {value})", "skip or repeat samples")
    assert _tree(tmp_path) == before


def _claim_worker(rank, world_size, ckpt_dirs):
    """Each rank sees its own --ckpt-dir: what ranks on nodes without a shared filesystem see."""
    import train
    from minipipe.config import make_config
    from minipipe.tracking.metrics import MetricsLogger
    cfg = make_config(model="transformer", layers=2, d_model=16, heads=2, max_seq_len=8,
                      data="synthetic", batch_size=8, microbatches=2, steps=1, eval_every=0,
                      ckpt_dir=ckpt_dirs[rank], timeout=30.0)
    train.train(cfg, logger=MetricsLogger([]))


def test_a_ckpt_dir_not_shared_by_every_rank_is_refused_before_training(tmp_path):
    from tests.spawn import run_workers
    dirs = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    (tmp_path / "node1").mkdir()  # the same path on the other node exists, but is another disk
    outcomes = run_workers(_claim_worker, 2, dirs, expect_failure=True, timeout_s=90)
    for outcome in outcomes:
        assert outcome.error == "CheckpointError", outcome
        assert "cannot see the files that ranks [1] wrote" in outcome.message
        assert "filesystem every node shares" in outcome.message
    assert _tree(tmp_path) == {}  # no step saved, lock released, every probe removed


# ---- an empty value is refused, never taken as "unset" or "here" -----------------------------
@pytest.mark.parametrize("flag", ["--ckpt-dir", "--init-from", "--data", "--resume",
                                  "--metrics-jsonl", "--trace", "--out-dir"])
def test_an_empty_path_is_refused_by_name(cli, tmp_path, monkeypatch, flag):
    monkeypatch.chdir(tmp_path)  # where an empty path would have written
    refused(cli(flag, ""), f"{flag} is empty", "give a path")
    assert _tree(tmp_path) == {}


def test_an_empty_minipipe_cache_is_refused_by_name(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MINIPIPE_CACHE", "")
    refused(cli("--data", "stdlib"), "MINIPIPE_CACHE is set but empty")
    assert _tree(tmp_path) == {}


# ---- data that would train wrong, or never end ---------------------------------------------------
def test_a_truncated_corpus_cache_is_rebuilt_not_trained_on(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIPIPE_CACHE", str(tmp_path))
    train, val = (np.array(split) for split in data._stdlib_corpus())
    cached = next(tmp_path.glob("stdlib-*.train.u8"))
    with open(cached, "r+b") as fh:
        fh.truncate(cached.stat().st_size // 2)
    again, val_again = data._stdlib_corpus()
    assert np.array_equal(again, train) and np.array_equal(val_again, val)


def test_token_ids_beside_text_are_not_read_as_bytes(cli, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "notes.txt").write_text("some text " * 100)
    (np.arange(1000, dtype=np.uint16) % 256).tofile(corpus / "ids.bin")
    refused(cli("--data", corpus), "holds token-id files (ids.bin)", "pass the .bin itself")


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo", "fifo.npz"])
def test_a_device_or_a_fifo_is_refused_not_read_forever(cli, tmp_path, kind):
    source = kind if kind.startswith("/") else tmp_path / kind
    if not kind.startswith("/"):
        os.mkfifo(source)
    model = ["--model", "amoebanet", "--image-size", "8"] if kind.endswith(".npz") else []
    previous = signal.signal(signal.SIGALRM, signal.default_int_handler)
    signal.alarm(60)  # a read that blocks fails the test instead of hanging the suite
    try:
        refused(cli(*model, "--data", source), "not a regular file or directory")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---- flags and the launcher's environment --------------------------------------------------------
@pytest.mark.parametrize("flags,needles", [
    (["--timeout", "1e12"], ["--timeout must be between"]),
    (["--timeout", "1e-9"], ["--timeout must be between"]),
    (["--balance", "\u00b2,1", "--layers", "1"], ["--balance"]),  # superscript two: isdigit() says yes
    (["--balance", "\uff12"], ["--balance"]),  # a full-width 2
    (["--run-name", "a\0b"], ["--run-name holds a NUL character"]),
])
def test_extreme_and_exotic_flag_values(cli, flags, needles):
    refused(cli(*flags), *needles)


@pytest.mark.parametrize("content,needle", [(None, "is a directory"),
                                            (b"steps = 2\n\xff\xfe\n", "not UTF-8"),
                                            ("/dev/zero", "is not a regular file")])
def test_a_config_that_is_a_directory_a_device_or_not_utf8(cli, tmp_path, content, needle):
    path = tmp_path / "run.toml"
    if content is None:
        path.mkdir()
    elif content == "/dev/zero":
        path = content
    else:
        path.write_bytes(content)
    refused(cli("--config", path), "--config", needle)


@pytest.mark.parametrize("env,needle", [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' is not an integer in 1.."),
    ({"RANK": "-1"}, "RANK='-1' is not an integer"),
    ({"LOCAL_RANK": "x"}, "LOCAL_RANK='x'"),
    ({"MASTER_PORT": "99999"}, "MASTER_PORT='99999' is not an integer in 1..65535"),
    ({"RANK": "3", "WORLD_SIZE": "2"}, "RANK=3 is not below WORLD_SIZE=2"),
])
def test_a_malformed_launcher_variable_is_refused_by_name(cli, monkeypatch, env, needle):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    refused(cli(), needle)


def test_the_advice_never_asks_for_what_the_user_already_passed(cli, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert cli("--ckpt-dir", ckpt, "--steps", 1)[0] == 0
    (ckpt / "latest").unlink()  # (a copy without it, or a save that died before naming it)
    line = refused(cli("--ckpt-dir", ckpt, "--resume", "auto"), "holds checkpoints of another run",
                   f"--resume auto found no `latest` there: pass --resume {ckpt / 'step-000001'}")
    assert "pass --resume auto" not in line


@pytest.mark.parametrize("flags,needle", [
    (["--max-seq-len", "1000000000", "--seq-len", "8"], "GiB, more than the"),
    (["--d-model", "100000", "--heads", "2"], "GiB, more than the"),
    (["--vocab", "4000000000000"], "GiB, more than the"),
    (["--d-model", "2000000000", "--heads", "2"], "has a weight too large to size"),
    (["--layers", "1000000000"], "--layers 1000000000 is over 100000"),
])
def test_a_size_no_machine_holds_is_refused_before_anything_is_allocated(cli, flags, needle):
    refused(cli(*flags), needle, "smaller")


def test_a_label_of_a_billion_is_refused_before_anything_is_allocated(cli, tmp_path):
    images = np.zeros((40, 1, 8, 8), dtype=np.float32)
    labels = np.arange(40) % 3
    labels[5] = 10**9
    source = _npz(tmp_path / "images.npz", x=images, y=labels)
    refused(cli("--model", "amoebanet", "--image-size", "8", "--data", source),
            "--classes 1000000001", "GiB, more than the")
