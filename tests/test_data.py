"""Batches are pure functions of (seed, step); the cursor round-trips; bad data is refused clearly."""
import numpy as np
import pytest
import torch

from minipipe.config import make_config
from minipipe.data import DataCursor, load_dataset, load_settled
from minipipe.errors import DataError
from tests.spawn import run_workers


def lm(**kw):
    return make_config(model="transformer", layers=1, d_model=32, heads=2, seq_len=32, **kw)


def test_stdlib_corpus_is_real_text_split_by_file():
    data = load_dataset(lm())
    assert len(data.train) > 20_000_000 and len(data.val) > 500_000
    assert data.vocab == 256
    inputs, targets = data.batch(0, 4)
    assert inputs.shape == targets.shape == (4, 32)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    text = bytes(data.train[:2000]).decode("utf-8", errors="replace")
    assert "def " in text or "import " in text


def test_batch_is_a_pure_function_of_seed_and_step():
    a, b = load_dataset(lm()), load_dataset(lm())
    for step in (0, 7):
        for x, y in zip(a.batch(step, 8), b.batch(step, 8)):
            assert torch.equal(x, y)
    assert not torch.equal(a.batch(1, 8)[0], a.batch(2, 8)[0])
    assert not torch.equal(a.batch(1, 8)[0], load_dataset(lm(seed=5)).batch(1, 8)[0])


def _batches_in_worker(rank, world_size):
    data = load_dataset(make_config(model="amoebanet", data="synthetic"))
    return [data.batch(step, 6)[1] for step in range(3)]


def test_batches_are_independent_of_process_count():
    here = load_dataset(make_config(model="amoebanet", data="synthetic"))
    for rank_batches in run_workers(_batches_in_worker, 2):
        for step, labels in enumerate(rank_batches):
            assert torch.equal(labels, here.batch(step, 6)[1])


def test_image_epochs_visit_every_sample_once():
    data = load_dataset(make_config(model="amoebanet", data="synthetic"))
    n, batch = len(data.train_y), 5
    assert n % batch == 0  # so one epoch is a whole number of steps
    epoch = [data.batch(step, batch) for step in range(n // batch)]
    images = torch.cat([x for x, _ in epoch]).flatten(1)
    labels = torch.cat([y for _, y in epoch])
    assert torch.unique(images, dim=0).shape[0] == n == torch.unique(data.train_x.flatten(1), dim=0).shape[0]
    assert torch.equal(labels.sort().values, data.train_y.sort().values)
    next_epoch = torch.cat([data.batch(n // batch + step, batch)[1] for step in range(n // batch)])
    assert not torch.equal(next_epoch, labels)  # a fresh order each epoch


def test_cursor_round_trip():
    data = load_dataset(lm())
    cursor = DataCursor(data, 4)
    for _ in range(3):
        cursor.next_batch()
    state = cursor.state_dict()
    expected = cursor.next_batch()
    resumed = DataCursor(load_dataset(lm()), 4)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(resumed.next_batch(), expected))
    with pytest.raises(DataError, match="same --data"):
        DataCursor(load_dataset(lm(data="synthetic")), 4).load_state_dict(state)


def test_text_directory_and_bin_files(tmp_path):
    (tmp_path / "docs").mkdir()
    for i in range(3):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"document {i} " * 200)
    data = load_dataset(lm(data=str(tmp_path / "docs")))
    assert data.vocab == 256 and len(data.train) > len(data.val) > 0
    ids = (np.arange(5000) % 1000).astype(np.uint16)
    ids.tofile(tmp_path / "tokens.bin")
    data = load_dataset(lm(data=str(tmp_path / "tokens.bin"), vocab=1000))
    inputs, targets = data.batch(0, 2)
    assert int(inputs.max()) < 1000 and torch.equal(inputs[:, 1:], targets[:, :-1])


def test_digits_and_npz_images(tmp_path):
    cfg = make_config(model="amoebanet")
    data = load_dataset(cfg)
    assert (cfg.classes, cfg.channels) == (None, None)  # a Config is frozen: the data never changes it
    cfg, data = load_settled(cfg)
    assert (cfg.classes, cfg.channels) == (10, 1)
    assert data.batch(0, 5)[0].shape == (5, 1, 32, 32)
    np.savez(tmp_path / "set.npz", x=np.random.rand(40, 3, 16, 16).astype(np.float32),
             y=np.arange(40) % 4)
    cfg, data = load_settled(make_config(model="amoebanet", data=str(tmp_path / "set.npz")))
    assert cfg.classes == 4 and data.batch(0, 3)[0].shape == (3, 3, 32, 32)


@pytest.mark.parametrize("make_bad,needle", [
    (lambda p: str(p / "missing.txt"), "no such file"),
    (lambda p: (p / "empty.txt").write_text("") or str(p / "empty.txt"), "no bytes"),
    (lambda p: np.array([1, 2, 70000 % 65536, 900], dtype=np.uint16).tofile(p / "t.bin")
     or str(p / "t.bin"), "token id 4464, which is >= --vocab 100"),
])
def test_bad_data_is_refused_with_the_fix(tmp_path, make_bad, needle):
    with pytest.raises(DataError, match=needle):
        load_dataset(lm(data=make_bad(tmp_path), vocab=100))


def test_bin_without_vocab_asks_for_it(tmp_path):
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "t.bin")
    with pytest.raises(DataError, match="need --vocab"):
        load_dataset(lm(data=str(tmp_path / "t.bin")))


def test_uint32_token_files_are_read_when_declared(tmp_path):
    """Llama 3's 128,256 ids do not fit uint16: --token-dtype uint32 reads them, ids and order
    intact; the same file under the default uint16 is not silently reinterpreted."""
    vocab = 128_256
    ids = (np.arange(6000, dtype=np.int64) * 7919 % vocab).astype(np.uint32)
    assert ids.max() > 65_535
    ids.tofile(tmp_path / "tokens.bin")
    data = load_dataset(lm(data=str(tmp_path / "tokens.bin"), vocab=vocab, token_dtype="uint32"))
    assert np.array_equal(np.concatenate([data.train, data.val]), ids)
    inputs, targets = data.batch(0, 2)
    rows = [np.asarray(inputs[r]) for r in range(2)]
    for row in rows:  # each row is a contiguous window of the file's ids
        start = int(np.nonzero(ids == row[0])[0][0])
        assert np.array_equal(ids[start:start + len(row)], row)
    assert int(inputs.max()) >= 65_536 and torch.equal(inputs[:, 1:], targets[:, :-1])
    with pytest.raises(DataError, match="--vocab 128256 has ids that do not fit uint16"):
        load_dataset(lm(data=str(tmp_path / "tokens.bin"), vocab=vocab))


@pytest.mark.parametrize("ids, vocab, needle", [
    (np.array([1, 2, 3], dtype=np.uint16), 1000, "not a whole number of uint32 token ids"),
    (np.array([1, 2, 200_000, 3], dtype=np.uint32), 128_256, "token id 200000, which is >= --vocab 128256"),
])
def test_bad_uint32_files_are_refused_by_name(tmp_path, ids, vocab, needle):
    ids.tofile(tmp_path / "t.bin")
    with pytest.raises(DataError, match=needle):
        load_dataset(lm(data=str(tmp_path / "t.bin"), vocab=vocab, token_dtype="uint32"))


def test_the_first_corpus_build_says_what_it_builds_and_a_cached_one_is_silent(tmp_path, monkeypatch, capsys):
    from minipipe import data
    monkeypatch.setenv("MINIPIPE_CACHE", str(tmp_path))
    train_bytes, val_bytes = data._stdlib_corpus()
    out = capsys.readouterr().out
    assert out.startswith("caching the stdlib corpus (once): ") and str(tmp_path) in out
    assert f"{(len(train_bytes) + len(val_bytes)) / 1e6:.0f} MB" in out  # the size it wrote
    data._stdlib_corpus()
    assert capsys.readouterr().out == ""
