"""Deterministic data: the batch of step s is a pure function of (seed, s).

Every rank can compute any batch on its own (stage 0 needs the inputs, the last stage the
targets, all of them the loss normaliser), so no data is sent between processes and the batches
are the same whatever the number of processes. The training position is a `DataCursor`.

Sources: `stdlib` (bytes of the running Python's standard library .py files, split by file and
cached as a memmap), a text file or directory (bytes), a `.bin` of uint16 ids (nanoGPT format;
a directory holding train.bin and val.bin works too; uint32 ids when --token-dtype uint32 says
so, never guessed from the size), `digits` (scikit-learn's bundled 8x8
digits), a `.npz` with arrays x (N, C, H, W) and y (N,), and `synthetic` for both families.
"""
import hashlib
import os
import sysconfig
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minipipe.config import with_data_fields
from minipipe.errors import DataError
from minipipe.models import registry
from minipipe.seeding import derive_seed

VAL_EVERY = 20  # every 20th file (or sample) goes to validation; contiguous files: the last 1/20th


def _generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


@dataclass
class TokenDataset:
    name: str
    train: np.ndarray
    val: np.ndarray
    vocab: int
    seq_len: int
    seed: int

    def batch(self, index: int, batch_size: int, split: str = "train"):
        """(inputs, targets), both (batch_size, seq_len) int64; targets are inputs shifted by one."""
        tokens = self.train if split == "train" else self.val
        high = len(tokens) - self.seq_len - 1
        offsets = torch.randint(0, high + 1, (batch_size,), generator=_generator(self.seed, split, index))
        rows = offsets.numpy()[:, None] + np.arange(self.seq_len + 1)
        chunk = torch.from_numpy(np.asarray(tokens[rows]).astype(np.int64))
        return chunk[:, :-1], chunk[:, 1:]

    def fingerprint(self) -> str:
        return f"{self.name}:{len(self.train)}:{len(self.val)}:{self.vocab}"

    @property
    def data_fields(self) -> dict:
        """The config fields this data decides when the flags leave them unset."""
        return {"vocab": self.vocab}


@dataclass
class ImageDataset:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    seed: int
    classes: int  # the label ids lie in 0..classes-1

    def batch(self, index: int, batch_size: int, split: str = "train"):
        """(images (B, C, H, W) float32, labels (B,) int64). Training walks a fresh permutation
        of the set each epoch; validation batch i is the i-th slice of the validation set."""
        if split == "train":
            n = len(self.train_y)
            positions = index * batch_size + torch.arange(batch_size)
            picks = torch.stack([self._permutation(int(p) // n)[int(p) % n] for p in positions])
            return self.train_x[picks], self.train_y[picks]
        picks = (index * batch_size + torch.arange(batch_size)) % len(self.val_y)
        return self.val_x[picks], self.val_y[picks]

    @lru_cache(maxsize=2)
    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.train_y), generator=_generator(self.seed, "epoch", epoch))

    def __hash__(self):
        return id(self)

    def fingerprint(self) -> str:
        return f"{self.name}:{len(self.train_y)}:{len(self.val_y)}:{tuple(self.train_x.shape[1:])}"

    @property
    def data_fields(self) -> dict:
        """The config fields this data decides when the flags leave them unset."""
        return {"channels": self.train_x.shape[1], "classes": self.classes}


class DataCursor:
    """The position in the training stream: batch `position` comes next. Saved in checkpoints."""

    def __init__(self, dataset, batch_size: int, position: int = 0):
        self.dataset, self.batch_size, self.position = dataset, batch_size, position

    def next_batch(self):
        batch = self.dataset.batch(self.position, self.batch_size)
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position, "dataset": self.dataset.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        if state["dataset"] != self.dataset.fingerprint():
            raise DataError(f"the checkpoint was trained on data {state['dataset']!r} but this run "
                            f"reads {self.dataset.fingerprint()!r}; pass the same --data (and --vocab)")
        self.position = state["position"]


def load_settled(cfg):
    """(the run's final Config, its dataset): the data `cfg.data` names, and cfg with the fields
    the data decides (vocab, classes, channels) filled where the flags left them unset."""
    dataset = load_dataset(cfg)
    return with_data_fields(cfg, dataset.data_fields), dataset


def load_dataset(cfg):
    """The dataset `cfg.data` names; its `data_fields` hold the vocab / classes / channels the
    run uses (the flags' values, else the data's). cfg is left as it is (frozen)."""
    family = registry.family(cfg)
    source = cfg.data or family.default_data
    if family.reads_tokens:
        dataset = _load_tokens(source, cfg)
        if len(dataset.train) <= cfg.seq_len + 1 or len(dataset.val) <= cfg.seq_len + 1:
            raise DataError(f"--data {source}: {len(dataset.train)} training / {len(dataset.val)} "
                            f"validation tokens are too few for --seq-len {cfg.seq_len}; "
                            f"use more data or a shorter --seq-len")
        return dataset
    return _load_images(source, cfg)


def _load_tokens(source: str, cfg) -> TokenDataset:
    if source == "stdlib":
        train, val, vocab = *_stdlib_corpus(), 256
    elif source == "synthetic":
        train, val, vocab = *_synthetic_tokens(), 256
    elif source in ("digits",):
        raise DataError(f"--data {source} is image data; use it with --model amoebanet")
    else:
        train, val, vocab = _token_files(Path(source), cfg.vocab, cfg.token_dtype, _vocab_named(cfg))
    if cfg.vocab is not None and cfg.vocab < vocab and not source.endswith(".bin"):
        raise DataError(f"{_vocab_named(cfg)} {cfg.vocab} is smaller than the data's {vocab} byte "
                        f"values; " + ("the model cannot read this data as bytes" if cfg.init_from
                                       else f"raise --vocab to at least {vocab}"))
    return TokenDataset(source, train, val, cfg.vocab or vocab, cfg.seq_len, cfg.seed)


def _vocab_named(cfg) -> str:
    """What set the vocabulary, for messages: a flag the user did not pass is never named."""
    return "--init-from's vocab_size" if cfg.init_from else "--vocab"


def cache_dir() -> Path:
    """Where the stdlib corpus is cached: $MINIPIPE_CACHE, else ~/.cache/minipipe. Set but empty
    is refused: Path("") is the current directory, which would fill with corpus files."""
    value = os.environ.get("MINIPIPE_CACHE")
    if value is not None and not value.strip():
        raise DataError("MINIPIPE_CACHE is set but empty; unset it (the cache is then "
                        "~/.cache/minipipe) or name a directory")
    return Path(value) if value is not None else Path.home() / ".cache" / "minipipe"


def _stdlib_corpus():
    """Bytes of every stdlib .py file, sorted by path; every VAL_EVERY-th file is validation."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    sizes = {p: p.stat().st_size for p in files}
    listing = "\n".join(f"{p.relative_to(root)}:{size}" for p, size in sizes.items())
    key = hashlib.sha256(listing.encode()).hexdigest()[:16]
    paths = {split: cache_dir() / f"stdlib-{key}.{split}.u8" for split in ("train", "val")}
    chosen_by_split = {"train": [f for i, f in enumerate(files) if i % VAL_EVERY],
                       "val": files[::VAL_EVERY]}
    # A cache file of another size (truncated by a full disk, or edited) is rebuilt, not read.
    if not all(p.is_file() and p.stat().st_size == sum(sizes[f] for f in chosen_by_split[s])
               for s, p in paths.items()):
        if os.environ.get("RANK", "0") == "0":  # a first run's pause, explained once
            print(f"caching the stdlib corpus (once): {len(files)} .py files of {root}, "
                  f"{sum(sizes.values()) / 1e6:.0f} MB, into {cache_dir()}", flush=True)
        for split, chosen in chosen_by_split.items():
            tmp = paths[split].with_suffix(f".tmp{os.getpid()}")
            try:
                tmp.parent.mkdir(parents=True, exist_ok=True)
                with open(tmp, "wb") as out:
                    for f in chosen:
                        out.write(f.read_bytes())
            except OSError as err:  # disk full: a partial file would keep it full
                tmp.unlink(missing_ok=True)
                raise DataError(f"caching the stdlib corpus in {tmp.parent} failed ({err}); free "
                                f"space there or set MINIPIPE_CACHE to another directory") from None
            os.replace(tmp, paths[split])  # atomic: ranks building at once cannot see half a file
    return tuple(np.memmap(paths[s], dtype=np.uint8, mode="r") for s in ("train", "val"))


def _synthetic_tokens():
    """A sparse random bigram language (4 successors per byte): entropy ln 4, learnable."""
    g = np.random.default_rng(0)
    successors = g.integers(0, 256, size=(256, 4))
    choices = g.integers(0, 4, size=300_000)
    tokens = np.empty(len(choices), dtype=np.uint8)
    tokens[0] = 0
    for i in range(1, len(tokens)):
        tokens[i] = successors[tokens[i - 1], choices[i]]
    split = len(tokens) * (VAL_EVERY - 1) // VAL_EVERY
    return tokens[:split], tokens[split:]


def _token_files(path: Path, vocab, token_dtype: str, vocab_named: str):
    if not path.exists():
        raise DataError(f"--data {path}: no such file or directory; pass stdlib, synthetic, "
                        f"a text file, a directory of text files, or a .bin of uint16 token ids")
    _regular_file_or_directory(path)
    if path.is_dir() and {"train.bin", "val.bin"} & {p.name for p in path.iterdir()}:
        splits = {s: path / f"{s}.bin" for s in ("train", "val")}
        absent = [str(p) for p in splits.values() if not p.is_file()]
        if absent:  # one of the pair: reading the directory as text bytes would train on ids
            raise DataError(f"--data {path}: holds nanoGPT token files but not {absent[0]}; add "
                            f"it, or pass the one .bin file itself (its last 1/{VAL_EVERY} "
                            f"becomes validation)")
        return (*(_read_bin(splits[s], vocab, token_dtype, vocab_named) for s in ("train", "val")), vocab)
    if path.suffix == ".bin":
        tokens = _read_bin(path, vocab, token_dtype, vocab_named)
        split = len(tokens) * (VAL_EVERY - 1) // VAL_EVERY
        return tokens[:split], tokens[split:], vocab
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    token_files = [p for p in files if p.suffix == ".bin"]
    if path.is_dir() and token_files:  # uint16 ids read as bytes would train on garbage
        raise DataError(f"--data {path}: holds token-id files ({token_files[0].name}) among the "
                        f"files it would read as text; pass the .bin itself, a directory holding "
                        f"train.bin and val.bin, or a directory of text only")
    if len(files) >= VAL_EVERY:
        parts = ([f for i, f in enumerate(files) if i % VAL_EVERY], files[::VAL_EVERY])
        train, val = (np.frombuffer(b"".join(f.read_bytes() for f in fs), dtype=np.uint8) for fs in parts)
    else:
        data = np.frombuffer(b"".join(f.read_bytes() for f in files), dtype=np.uint8)
        split = len(data) * (VAL_EVERY - 1) // VAL_EVERY
        train, val = data[:split], data[split:]
    if len(train) == 0:
        raise DataError(f"--data {path}: no bytes to train on (empty file or directory)")
    return train, val, 256


def _regular_file_or_directory(path: Path) -> None:
    """A device (/dev/zero) or a FIFO would be read until memory runs out, or block forever."""
    if not (path.is_file() or path.is_dir()):
        raise DataError(f"--data {path}: not a regular file or directory (a device, pipe or "
                        f"socket is never read); pass a file or directory")


def _read_bin(path: Path, vocab, token_dtype: str, vocab_named: str) -> np.ndarray:
    """The ids of a .bin file of the declared element type (--token-dtype): a uint32 file read as
    uint16 would be twice as many wrong ids, so the type is never inferred."""
    if vocab is None:
        raise DataError(f"--data {path}: token-id files need --vocab (the tokenizer's vocabulary size)")
    dtype = np.dtype(token_dtype)
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"--data {path}: the file is empty")
    if size % dtype.itemsize:
        raise DataError(f"--data {path}: {size} bytes is not a whole number of {token_dtype} token "
                        f"ids; the file is truncated, or its ids are of another type (--token-dtype)")
    if vocab > np.iinfo(dtype).max + 1:
        raise DataError(f"{vocab_named} {vocab} has ids that do not fit {token_dtype} (at most "
                        f"{np.iinfo(dtype).max + 1:,} ids); write the ids as uint32 and pass "
                        f"--token-dtype uint32")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    top = int(tokens.max())
    if top >= vocab:
        fix = (f"pass the tokenizer's vocabulary size (at least {top + 1}), or the --token-dtype "
               f"the file was written with" if vocab_named == "--vocab"
               else "use data made with that model's tokenizer, of the --token-dtype it was written with")
        raise DataError(f"--data {path}: holds token id {top}, which is >= {vocab_named} {vocab}; {fix}")
    return tokens


def _load_images(source: str, cfg) -> ImageDataset:
    if source == "digits":
        x, y = _digits()
    elif source == "synthetic":
        x, y = _synthetic_images(cfg.classes or 10, cfg.channels or 3, cfg.image_size)
    elif source.endswith(".npz"):
        x, y = _npz(Path(source))
    else:
        raise DataError(f"--data {source}: image models read digits, synthetic or a PATH.npz "
                        f"with arrays x (N, C, H, W) and y (N,)")
    if not torch.isfinite(x).all():
        raise DataError(f"--data {source}: the images hold NaN or infinite values; clean the data")
    if x.shape[-1] != cfg.image_size or x.shape[-2] != cfg.image_size:
        x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std().clamp_min(1e-8)
    classes = cfg.classes or int(y.max()) + 1
    if cfg.channels is not None and cfg.channels != x.shape[1]:
        raise DataError(f"--channels {cfg.channels} but the images have {x.shape[1]}; drop --channels")
    if int(y.max()) >= classes or int(y.min()) < 0:
        raise DataError(f"--data {source}: labels span {int(y.min())}..{int(y.max())}, but class ids "
                        f"must lie in 0..{classes - 1} (--classes {classes}); fix the labels "
                        f"or raise --classes")
    val = torch.arange(len(y)) % VAL_EVERY == 0
    if val.all():
        raise DataError(f"--data {source}: {len(y)} sample(s); every {VAL_EVERY}th goes to "
                        f"validation and none would be left to train on: give at least 2 samples")
    return ImageDataset(source, x[~val], y[~val], x[val], y[val], cfg.seed, classes)


def _digits():
    from sklearn.datasets import load_digits  # bundled with scikit-learn: nothing to download
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(digits.target, dtype=torch.int64)


def _synthetic_images(classes: int, channels: int, size: int, n: int = 2048):
    """Noisy copies of one random prototype per class: learnable, and fast to make."""
    g = torch.Generator().manual_seed(0)
    prototypes = torch.randn(classes, channels, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return prototypes[y] + 0.5 * torch.randn(n, channels, size, size, generator=g), y


def _npz(path: Path):
    if not path.exists():
        raise DataError(f"--data {path}: no such file")
    _regular_file_or_directory(path)
    layout = "arrays x (N, C, H, W) of numbers and y (N,) of integer class ids"
    if not zipfile.is_zipfile(path):
        raise DataError(f"--data {path}: not an .npz (zip) archive; save {layout} with np.savez")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if not {"x", "y"} <= set(arrays):
                raise DataError(f"--data {path}: needs {layout} (np.savez); found {list(arrays)}")
            x, y = arrays["x"], arrays["y"]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:  # e.g. object arrays
        raise DataError(f"--data {path}: not a readable .npz of {layout} ({err})") from None
    if not (np.issubdtype(x.dtype, np.number) and np.issubdtype(y.dtype, np.integer)):
        raise DataError(f"--data {path}: x must hold numbers and y integer class ids; got x "
                        f"{x.dtype} and y {y.dtype} (float labels would be truncated)")
    x, y = torch.from_numpy(x).float(), torch.from_numpy(y).long()
    if x.ndim != 4 or y.shape != (x.shape[0],) or len(y) == 0:
        raise DataError(f"--data {path}: x must be (N, C, H, W) and y (N,); got {tuple(x.shape)} "
                        f"and {tuple(y.shape)}")
    return x, y
