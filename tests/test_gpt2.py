"""GPT-2 in and out, against transformers (a tiny random GPT-2 made here; nothing downloaded):
an exported checkpoint computes minipipe's logits under GPT2LMHeadModel; `--init-from` starts at
transformers' loss at K=1 and K=2 and round-trips bitwise; bad directories are refused by name."""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

import train  # noqa: E402
from minipipe.checkpoint.hf_format import HFModelError, read_stage_weights  # noqa: E402
from minipipe.config import make_config  # noqa: E402
from minipipe.data import load_dataset  # noqa: E402
from minipipe.errors import DataError, MinipipeError  # noqa: E402
from minipipe.export import (
    export,  # noqa: E402
    load_exported,  # noqa: E402
)
from minipipe.layers import build_layers  # noqa: E402
from minipipe.tracking.metrics import MetricsLogger  # noqa: E402
from tests.spawn import run_workers  # noqa: E402

SHAPE = dict(vocab_size=300, n_positions=16, n_embd=32, n_layer=2, n_head=4)
RUN = dict(batch_size=4, microbatches=2, eval_every=0, log_every=100, wandb="disabled", warmup=0)


def _save_gpt2(directory, tied: bool, **save_kwargs):
    """A GPT-2 with every weight and bias perturbed (zero biases would hide a misplaced one)."""
    torch.manual_seed(0 if tied else 1)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPE, tie_word_embeddings=tied))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(directory, **save_kwargs)
    return directory


def _hf_tensors(directory):
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _train(**values):
    return train.train(make_config(**dict(RUN, **values)), logger=MetricsLogger([]))["losses"]


def _hf_loss(directory, cfg_values) -> float:
    """transformers' mean token cross-entropy of minipipe's step-0 batch."""
    cfg = make_config(**dict(RUN, **cfg_values))
    inputs, targets = load_dataset(cfg).batch(0, cfg.batch_size)
    model = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    with torch.no_grad():
        logits = model(input_ids=inputs).logits
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    ids = np.random.default_rng(0).integers(0, SHAPE["vocab_size"], 4096, dtype=np.uint16)
    ids.tofile(root / "tokens.bin")
    return {"root": root, "tokens": str(root / "tokens.bin"),
            "tied": _save_gpt2(root / "tied", True),
            "untied": _save_gpt2(root / "untied", False),
            "sharded": _save_gpt2(root / "sharded", True, max_shard_size="40KB")}


@pytest.mark.parametrize("tied", [True, False])
def test_an_exported_checkpoint_computes_minipipes_logits_under_transformers(tmp_path, tied):
    shape = dict(layers=2, d_model=32, heads=4, max_seq_len=16, data="synthetic", tie_embeddings=tied)
    _train(**shape, steps=1, lr=1e-2, ckpt_dir=str(tmp_path / "ckpt"))  # one step: no zero bias left
    export(tmp_path / "ckpt", tmp_path / "minipipe")
    export(tmp_path / "ckpt", tmp_path / "hf", format="hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["model_type"], config["tie_word_embeddings"], config["n_embd"]) == ("gpt2", tied, 32)
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    _, ours = load_exported(tmp_path / "minipipe")
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(ids)
        got = hf.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _import(directory, tokens, ckpt, **extra):
    """Step 0 from a GPT-2 directory at zero learning rate (weights unchanged), then export."""
    losses = _train(init_from=str(directory), data=tokens, vocab=SHAPE["vocab_size"], steps=1,
                    lr=0.0, min_lr=0.0, ckpt_dir=str(ckpt), **extra)
    return losses


def _import_worker(rank, world_size, directory, tokens, ckpt):
    return _import(directory, tokens, ckpt)


@pytest.mark.parametrize("source,n_stages", [("untied", 1), ("tied", 1), ("sharded", 2)])
def test_init_from_starts_at_transformers_loss_and_round_trips_bitwise(gpt2, tmp_path, source, n_stages):
    directory, ckpt = gpt2[source], tmp_path / "ckpt"
    if n_stages == 1:
        losses = _import(directory, gpt2["tokens"], ckpt)
    else:  # a sharded index, read by two stages, each opening only the files of its own layers
        losses = run_workers(_import_worker, 2, str(directory), gpt2["tokens"], str(ckpt), timeout_s=180)[0]
    expected = _hf_loss(directory, dict(init_from=str(directory), data=gpt2["tokens"]))
    assert abs(losses[0] - expected) <= 1e-6, (losses[0], expected)
    export(ckpt, tmp_path / "out", format="hf")
    original, back = _hf_tensors(directory), _hf_tensors(tmp_path / "out")
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name


def test_a_checkpoint_in_ckpt_dir_wins_over_init_from(gpt2, tmp_path):
    run = dict(init_from=str(gpt2["tied"]), data=gpt2["tokens"], lr=1e-2, min_lr=1e-2)  # flat lr
    straight = _train(**run, steps=3)
    _train(**run, steps=2, ckpt_dir=str(tmp_path))
    assert _train(**run, steps=3, ckpt_dir=str(tmp_path)) == straight[2:]  # resumed, not re-imported


def _edited_copy(source, target, edit_config=None, edit_tensors=None):
    shutil.copytree(source, target)
    if edit_config:
        config = json.loads((target / "config.json").read_text())
        edit_config(config)
        (target / "config.json").write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(target / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, target / "model.safetensors")
    return str(target)


def test_bad_gpt2_directories_and_flags_are_refused_by_name_before_training(gpt2, tmp_path):
    tied, tokens = gpt2["tied"], gpt2["tokens"]
    other = _edited_copy(tied, tmp_path / "other", edit_config=lambda c: c.update(model_type="llama"))
    with pytest.raises(HFModelError, match="model_type = 'llama'"):
        make_config(init_from=other)
    with pytest.raises(HFModelError, match=r"--d-model 64 contradicts .* n_embd = 32"):
        make_config(init_from=str(tied), d_model=64)
    missing = _edited_copy(tied, tmp_path / "missing",
                           edit_tensors=lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(HFModelError, match=r"tensor transformer\.h\.1\.mlp\.c_fc\.bias is missing"):
        _train(init_from=missing, data=tokens, steps=1)
    wrong = _edited_copy(tied, tmp_path / "wrong", edit_tensors=lambda t: t.update(
        {"transformer.h.0.attn.c_attn.weight": torch.zeros(32, 64)}))
    with pytest.raises(HFModelError, match=r"transformer\.h\.0\.attn\.c_attn\.weight has shape \[32, 64\]"):
        _train(init_from=wrong, data=tokens, steps=1)
    too_big = tmp_path / "ids.bin"
    np.array([1, 2, 400, 3] * 64, dtype=np.uint16).tofile(too_big)
    with pytest.raises(DataError, match="token id 400, which is >= --init-from's vocab_size 300; use data"):
        _train(init_from=str(tied), data=str(too_big), steps=1)
    assert issubclass(HFModelError, MinipipeError)


def test_a_stage_opens_only_the_files_that_hold_its_own_layers(gpt2, tmp_path):
    """Layer 0 loads from a sharded directory whose other shards are gone; layer 1 then names
    the missing file. (The K=2 run above reads the complete directory.)"""
    directory = tmp_path / "partial"
    shutil.copytree(gpt2["sharded"], directory)
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {weight_map["transformer.wte.weight"], weight_map["transformer.wpe.weight"]}
    removed = set(weight_map.values()) - needed
    assert removed, "the fixture's shards are too large to test this"
    for file in removed:
        (directory / file).unlink()
    cfg = make_config(init_from=str(directory))
    layers = build_layers(cfg, [0, 1])
    shapes = {i: {f"layers.{i}.{n}": p.shape for n, p in layers[i].named_parameters()} for i in (0, 1)}
    tensors = read_stage_weights(directory, cfg, shapes[0])
    original = _hf_tensors(gpt2["sharded"])
    assert torch.equal(tensors["layers.0.tokens.weight"], original["transformer.wte.weight"])
    with pytest.raises(HFModelError, match="is missing"):
        read_stage_weights(directory, cfg, shapes[1])
