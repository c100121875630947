"""Sampling and validation from a finished checkpoint or an export, trained nothing, written
nothing: checked against the exported model run as one plain nn.Sequential (load_exported), with
the sampling loop and the loss written out in plain PyTorch, and across pipeline stage counts."""
import math

import pytest
import torch
import torch.nn.functional as F

import train
from minipipe import evaluate, generate
from minipipe.config import make_config
from minipipe.data import load_dataset
from minipipe.export import export, load_exported
from minipipe.tracking.metrics import MetricsLogger
from tests.spawn import run_torchrun

SHAPE = dict(model="transformer", layers=2, d_model=32, heads=2, max_seq_len=16, data="synthetic",
             batch_size=8, microbatches=2, eval_every=0, eval_batches=3, dropout=0.1, steps=4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    cfg = make_config(**SHAPE, ckpt_dir=str(root / "ckpt"))
    history = train.train(cfg, logger=MetricsLogger([]))
    export(root / "ckpt", root / "model")
    export(root / "ckpt", root / "gpt2", format="hf")
    return root, history


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def reference_sample(model, prompt: list, n_new: int, max_context: int, temperature=0.8, top_k=40,
                     seed=1337) -> list:
    """Top-k sampling, one token at a time, on the whole model in one process."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n_new):
            logits = model(tokens[:, -max_context:])[:, -1, :].float() / temperature
            kth = torch.topk(logits, top_k).values[:, -1:]
            probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
            tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return tokens[0].tolist()


def test_generation_from_a_checkpoint_or_an_export_is_the_reference_sampler(trained):
    root, _ = trained
    before = _files(root)
    _, model = load_exported(root / "model")
    expected = bytes(reference_sample(model, list(b"def "), 40, SHAPE["max_seq_len"])).decode(
        "utf-8", errors="replace")
    for source in ("ckpt", "ckpt/step-000004", "model", "gpt2"):
        assert generate.generate_text(root / source, "def ", 40) == expected, source
    assert _files(root) == before  # nothing written


def test_validation_loss_is_the_plain_cross_entropy_and_the_logged_one(trained):
    root, history = trained
    before = _files(root)
    cfg, model = load_exported(root / "model")
    dataset = load_dataset(make_config(**SHAPE))
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(SHAPE["eval_batches"]):
            inputs, targets = dataset.batch(i, SHAPE["batch_size"], split="val")
            logits = model(inputs)
            total += F.cross_entropy(logits.flatten(0, 1).double(), targets.flatten(), reduction="sum").item()
            count += targets.numel()
    for source in ("ckpt", "model"):
        loss, _ = evaluate.validation_loss(root / source)
        assert loss == pytest.approx(total / count, rel=1e-5), source
        assert loss == pytest.approx(history["val_losses"][-1][1], rel=1e-6)  # what training logged
    assert _files(root) == before


def test_the_commands_print_and_refuse_what_they_cannot_use(trained, capsys, tmp_path):
    root, _ = trained
    loss, _ = evaluate.validation_loss(root / "ckpt", batches=1)
    assert evaluate.main([str(root / "ckpt"), "--batches", "1"]) == 0
    assert capsys.readouterr().out == (f"val loss {loss:.4f}, perplexity {math.exp(loss):.3f} (1 batches "
                                       f"of 8 from the validation split of synthetic)\n")
    assert generate.main([str(tmp_path), "--prompt", "x"]) == 2
    assert capsys.readouterr().err.startswith(f"minipipe error: {tmp_path} is neither a checkpoint")
    assert generate.main([str(root / "model"), "--prompt", "", "--tokens", "3"]) == 2
    assert "--prompt is empty" in capsys.readouterr().err


def test_two_stages_sample_and_evaluate_as_one_process(trained):
    root, _ = trained
    one = generate.generate_text(root / "ckpt", "import ", 24)
    done = run_torchrun(["-m", "minipipe.generate", str(root / "ckpt"), "--prompt", "import ",
                         "--tokens", "24"], nproc=2, timeout_s=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.rstrip("\n").endswith(one)
    loss, _ = evaluate.validation_loss(root / "model")
    done = run_torchrun(["-m", "minipipe.evaluate", str(root / "model")], nproc=2, timeout_s=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"val loss {loss:.4f}" in done.stdout


def test_a_byte_level_hf_export_has_valid_special_tokens_and_the_source_dropout(trained, recwarn):
    import json

    from transformers import GPT2Config, GPT2LMHeadModel
    root, _ = trained
    config = json.loads((root / "gpt2" / "config.json").read_text())
    assert config["bos_token_id"] is None and config["eos_token_id"] is None  # vocab 256: no <|endoftext|>
    assert config["embd_pdrop"] == config["resid_pdrop"] == SHAPE["dropout"]
    loaded = GPT2LMHeadModel.from_pretrained(root / "gpt2")
    assert GPT2Config.from_pretrained(root / "gpt2").eos_token_id is None
    assert loaded.config.vocab_size == 256
    assert not [w for w in recwarn if "token_id" in str(w.message)]
