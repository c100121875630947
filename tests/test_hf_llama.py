"""Llama (and Qwen2) in and out, against transformers (tiny random models built from its own
LlamaConfig / Qwen2Config here; nothing downloaded): minipipe's logits equal transformers' to 1e-5
in float32; `--init-from` starts at transformers' loss and round-trips bitwise through `--lr 0`
and `--format hf`; a K=2 import trains and resumes at K=3 as one uninterrupted run; what minipipe
does not compute is refused by name."""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

import train  # noqa: E402
from minipipe.checkpoint.hf_format import HFModelError, read_stage_weights  # noqa: E402
from minipipe.config import make_config  # noqa: E402
from minipipe.data import load_dataset  # noqa: E402
from minipipe.export import export  # noqa: E402
from minipipe.layers import build_layers  # noqa: E402
from minipipe.models import registry  # noqa: E402
from minipipe.tracking.metrics import MetricsLogger  # noqa: E402
from tests.spawn import run_workers  # noqa: E402

SHAPE = dict(vocab_size=300, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
             rms_norm_eps=1e-5, rope_theta=500.0)
RUN = dict(model="llama", batch_size=4, microbatches=2, eval_every=0, log_every=100,
           wandb="disabled", warmup=0)
KINDS = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
         "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}


def _save(directory, kind: str, tied: bool, **save_kwargs):
    """A model with every weight perturbed (unit norm weights or zero biases would hide a
    misplaced one)."""
    torch.manual_seed(hash((kind, tied)) % 1000)
    config_class, model_class = KINDS[kind]
    model = model_class(config_class(**SHAPE, tie_word_embeddings=tied))
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


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    ids = np.random.default_rng(0).integers(0, SHAPE["vocab_size"], 4096, dtype=np.uint16)
    ids.tofile(root / "tokens.bin")
    return {"root": root, "tokens": str(root / "tokens.bin"),
            "tied": _save(root / "tied", "llama", True),
            "untied": _save(root / "untied", "llama", False),
            "qwen2": _save(root / "qwen2", "qwen2", False),
            "sharded": _save(root / "sharded", "llama", True, max_shard_size="40KB")}


@pytest.mark.parametrize("source", ["tied", "untied", "qwen2"])
def test_logits_equal_transformers_in_float32(models, source):
    directory = models[source]
    cfg = make_config(model="llama", init_from=str(directory))
    assert cfg.attention_bias == (source == "qwen2") and cfg.kv_heads == 2 and cfg.rope_theta == 500.0
    n_layers = len(registry.layer_factories(cfg))
    layers = build_layers(cfg, range(n_layers))
    shapes = {name: p.shape for i in layers for name, p in
              {f"layers.{i}.{n}": p for n, p in layers[i].named_parameters()}.items()}
    tensors = read_stage_weights(directory, cfg, shapes)
    model = torch.nn.Sequential(*layers.values())
    model.load_state_dict({name.removeprefix("layers."): t for name, t in tensors.items()},
                          strict=not cfg.tie_embeddings)  # tied: the head's proj is the embedding
    ids = torch.randint(0, SHAPE["vocab_size"], (3, 16), generator=torch.Generator().manual_seed(0))
    hf = KINDS["qwen2" if source == "qwen2" else "llama"][1].from_pretrained(directory).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), hf(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def _hf_loss(directory, model_class, cfg_values) -> float:
    """transformers' mean token cross-entropy of minipipe's step-0 batch."""
    cfg = make_config(**dict(RUN, **cfg_values))
    inputs, targets = load_dataset(cfg).batch(0, cfg.batch_size)
    model = model_class.from_pretrained(directory).eval()
    with torch.no_grad():
        logits = model(input_ids=inputs).logits
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)))


def _import(directory, tokens, ckpt):
    """Step 0 from a Hugging Face directory at zero learning rate (weights unchanged)."""
    return _train(init_from=str(directory), data=tokens, steps=1, lr=0.0, min_lr=0.0, ckpt_dir=str(ckpt))


def _import_worker(rank, world_size, directory, tokens, ckpt):
    return _import(directory, tokens, ckpt)


@pytest.mark.parametrize("source,n_stages", [("untied", 1), ("qwen2", 1), ("sharded", 2)])
def test_init_from_starts_at_transformers_loss_and_round_trips_bitwise(models, tmp_path, source, n_stages):
    directory, ckpt = models[source], tmp_path / "ckpt"
    if n_stages == 1:
        losses = _import(directory, models["tokens"], ckpt)
    else:  # a sharded index, read by two stages, each opening only the files of its own layers
        losses = run_workers(_import_worker, 2, str(directory), models["tokens"], str(ckpt), timeout_s=300)[0]
    model_class = KINDS["qwen2" if source == "qwen2" else "llama"][1]
    expected = _hf_loss(directory, model_class, dict(init_from=str(directory), data=models["tokens"]))
    assert abs(losses[0] - expected) <= 1e-6, (losses[0], expected)
    export(ckpt, tmp_path / "out", format="hf")
    original, back = _hf_tensors(directory), _hf_tensors(tmp_path / "out")
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    _, info = model_class.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


RESUME = dict(lr=1e-2, min_lr=1e-2, ckpt_every=2)  # flat learning rate


def _k2_worker(rank, world_size, directory, tokens, ckpt):
    return _train(init_from=directory, data=tokens, steps=2, ckpt_dir=ckpt, **RESUME)


def _k3_worker(rank, world_size, directory, tokens, ckpt):
    return _train(init_from=directory, data=tokens, steps=4, ckpt_dir=ckpt, **RESUME)


def test_a_k2_import_trains_and_resumes_at_k3(models, tmp_path):
    """A tied import trained two steps on two stages resumes on three (the tied weight re-cut)
    and takes the steps an uninterrupted single-process run takes."""
    directory, tokens, ckpt = str(models["tied"]), models["tokens"], str(tmp_path / "ckpt")
    straight = _train(init_from=directory, data=tokens, steps=4, **dict(RESUME, ckpt_every=0))
    first = run_workers(_k2_worker, 2, directory, tokens, ckpt, timeout_s=300)[0]
    rest = run_workers(_k3_worker, 3, directory, tokens, ckpt, timeout_s=300)[0]
    assert first + rest == pytest.approx(straight, rel=1e-5)
    assert rest[0] != straight[0]  # resumed at step 2, not re-imported


def _edited_copy(source, target, edit):
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    edit(config)
    (target / "config.json").write_text(json.dumps(config))
    return str(target)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
     "rope type 'llama3'"),
    (lambda c: c.update(rope_scaling={"type": "linear", "factor": 2.0}), "rope type 'linear'"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act = 'gelu'"),
    (lambda c: c.update(attention_bias=True), "attention_bias = True"),
    (lambda c: c.update(mlp_bias=True), "mlp_bias = True"),
    (lambda c: c.update(model_type="qwen2", use_sliding_window=True), "use_sliding_window = True"),
    (lambda c: c.update(model_type="mistral"), "model_type = 'mistral'"),
    (lambda c: c.update(head_dim=16), "head_dim = 16"),
])
def test_what_minipipe_does_not_compute_is_refused_by_name(models, tmp_path, edit, message):
    bad = _edited_copy(models["untied"], tmp_path / "bad", edit)
    with pytest.raises(HFModelError, match=message):
        make_config(model="llama", init_from=bad)


def test_flags_that_contradict_the_import_and_other_families_are_refused(models):
    with pytest.raises(HFModelError, match=r"--kv-heads 4 contradicts .* num_key_value_heads = 2"):
        make_config(model="llama", init_from=str(models["untied"]), kv_heads=4)
    with pytest.raises(HFModelError, match="model_type = 'llama', a --model llama model; --model is "
                                           "'transformer': pass --model llama"):
        make_config(init_from=str(models["untied"]))
    with pytest.raises(HFModelError, match="--model is 'amoebanet'"):
        make_config(model="amoebanet", init_from=str(models["untied"]))


# ---- the hostile-input checks of hf_format apply to the Llama reader too ----------------------
@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(num_hidden_layers=True), "num_hidden_layers = True"),
    (lambda c: c.update(hidden_size="32"), "hidden_size = '32'"),
    (lambda c: c.update(intermediate_size=10**9), "intermediate_size an integer in 1.."),
    (lambda c: c.pop("vocab_size"), "vocab_size set"),
    (lambda c: c.update(num_key_value_heads=3), "num_key_value_heads an integer dividing"),
    (lambda c: c.update(num_key_value_heads=True), "num_key_value_heads = True"),
    (lambda c: c.update(rms_norm_eps="1e-5"), "rms_norm_eps = '1e-5'"),
    (lambda c: c.update(rope_theta=-1.0, rope_parameters=None), "rope_theta a finite number > 0"),
    (lambda c: c.update(rope_parameters=[1]), "rope_parameters an object or null"),
    (lambda c: c.update(mlp_bias=0), "mlp_bias = false only"),
    (lambda c: c.update(layer_types="full_attention"), "layer_types = 'full_attention'"),
    (lambda c: c.update(tie_word_embeddings="false"), "tie_word_embeddings true or false"),
    (lambda c: c.update(vocab_size=301), r"vocab_size x hidden_size = \[301, 32\], but model.embed_tokens"),
    (lambda c: c.update(num_hidden_layers=10**6), "the weights hold no model.layers.999999.input_layernorm"),
    (lambda c: c.update(num_hidden_layers=2), "the weights hold block model.layers.2, but config.json has "
                                              "num_hidden_layers = 2"),
])
def test_every_llama_config_field_is_checked_by_type_and_range(models, tmp_path, edit, message):
    bad = _edited_copy(models["untied"], tmp_path / "bad", edit)
    with pytest.raises(HFModelError, match=message):
        make_config(model="llama", init_from=bad)


@pytest.mark.parametrize("case", ["absolute", "dotdot", "config symlinked out"])
def test_a_llama_directory_cannot_point_a_read_outside_itself(models, tmp_path, case):
    outside = tmp_path / "outside"
    outside.mkdir()
    directory = tmp_path / "hf"
    shutil.copytree(models["untied"], directory)
    if case == "config symlinked out":
        shutil.move(directory / "config.json", outside / "config.json")
        (directory / "config.json").symlink_to(outside / "config.json")
    else:
        names = load_file(directory / "model.safetensors")
        weight_map = {name: "model.safetensors" for name in names}
        weight_map["model.embed_tokens.weight"] = (str(outside / "x.safetensors") if case == "absolute"
                                                   else "../outside/x.safetensors")
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(HFModelError, match="lies outside"):
        make_config(model="llama", init_from=str(directory))


def test_nan_in_llama_weights_is_refused_as_corrupt(models, tmp_path):
    from safetensors.torch import save_file
    directory = tmp_path / "hf"
    shutil.copytree(models["untied"], directory)
    tensors = load_file(directory / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    cfg = make_config(model="llama", init_from=str(directory))
    layers = build_layers(cfg, [2])
    shapes = {f"layers.2.{n}": p.shape for n, p in layers[2].named_parameters()}
    with pytest.raises(HFModelError, match=r"model\.layers\.1\.mlp\.up_proj\.weight holds NaN or infinite"):
        read_stage_weights(directory, cfg, shapes)


@pytest.mark.parametrize("source", ["tied", "qwen2"])
def test_generate_and_evaluate_open_a_llama_directory(models, source):
    """minipipe.inference opens a Llama or Qwen2 directory as it opens GPT-2's: the family from
    its model_type, the weights through --init-from's reader."""
    from minipipe.inference import open_run, source_kind
    directory = models[source]
    assert source_kind(directory) == "hf"
    run = open_run(directory, seq_len=8, batch_size=2, microbatches=1)
    assert run.cfg.model == "llama" and run.cfg.attention_bias == (source == "qwen2")
    hf = _hf_tensors(directory)
    assert torch.equal(run.stage.state_dict()["layers.1.q_proj.weight"], hf["model.layers.0.self_attn.q_proj.weight"])
