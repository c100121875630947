"""Hugging Face LlamaForCausalLM (and Qwen2ForCausalLM, Llama with q/k/v biases) <-> minipipe's
Llama: the config, and every tensor's name, both ways: a converter for
minipipe/checkpoint/hf_format.py, which reads and writes the files.

    import:  train.py --model llama --init-from DIR
    export:  python -m minipipe.export CKPT OUT --format hf   (Qwen2's config when attention_bias)

Correspondence (global layer i of [Embedding, Block x L, Head]; both store nn.Linear's layout):
    layers.0.tokens.weight                      model.embed_tokens.weight
    layers.{b+1}.attn_norm, mlp_norm            model.layers.{b}.input_layernorm, post_attention_layernorm
    layers.{b+1}.q_proj, k_proj, v_proj, o_proj model.layers.{b}.self_attn.*   (q/k/v biases: Qwen2)
    layers.{b+1}.gate_proj, up_proj, down_proj  model.layers.{b}.mlp.*
    layers.{L+1}.norm                           model.norm
    layers.{L+1}.proj.weight                    lm_head.weight, or embed_tokens when tie_word_embeddings
What minipipe does not compute is refused by name: a rope_scaling / rope_parameters type other
than the default, sliding-window attention, an activation other than silu, MLP biases, an o_proj
bias (Llama's attention_bias), a head_dim other than hidden_size / num_attention_heads.
"""
from minipipe.errors import HFModelError

HF_CONFIG = "config.json"
MODEL_TYPES = ("llama", "qwen2")
# minipipe shape field -> config key (all required)
SHAPE_KEYS = {"layers": "num_hidden_layers", "d_model": "hidden_size", "heads": "num_attention_heads",
              "ffn_dim": "intermediate_size", "max_seq_len": "max_position_embeddings",
              "vocab": "vocab_size"}
BLOCK = {  # Block parameter -> its name under model.layers.{b}.
    "attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
    **{f"{p}_proj.{kind}": f"self_attn.{p}_proj.{kind}" for p in "qkv" for kind in ("weight", "bias")},
    "o_proj.weight": "self_attn.o_proj.weight",
    **{f"{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
}
ROTARY_BUFFER = "rotary_emb.inv_freq"  # older checkpoints store it; minipipe computes it


def _rope(directory, config: dict) -> float:
    """rope_theta, after refusing any scaled rotary embedding: transformers 5 writes
    rope_parameters {rope_type, rope_theta}, older files rope_theta and rope_scaling."""
    parameters = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kinds = (parameters.get("rope_type"), scaling.get("rope_type"), scaling.get("type"))
    kind = next((kind for kind in kinds if kind not in (None, "default")), "default")
    if kind != "default":
        raise HFModelError(f"--init-from {directory}: {HF_CONFIG} has a rope type {kind!r}; minipipe "
                           f"computes the default rotary embedding only (no rope_scaling)")
    return float(parameters.get("rope_theta", config.get("rope_theta", 10000.0)))


def read_config(directory, config: dict) -> dict:
    """{Config field: (value, config.json key)} from DIR's config.json, refused unless it
    describes Llama math minipipe computes exactly."""
    model_type = config.get("model_type")
    qwen2 = model_type == "qwen2"
    checks = [("model_type", model_type, MODEL_TYPES),
              ("hidden_act", config.get("hidden_act", "silu"), "silu"),
              ("mlp_bias", config.get("mlp_bias", False), False),
              # Llama's attention_bias also gives o_proj a bias, which minipipe's Block has not
              ("attention_bias", config.get("attention_bias", False), False),
              ("use_sliding_window", config.get("use_sliding_window", False), False)]
    checks += [("layer_types", kind, "full_attention") for kind in config.get("layer_types") or ()]
    for key, value, allowed in checks:
        if value not in (allowed if isinstance(allowed, tuple) else (allowed,)):
            raise HFModelError(f"--init-from {directory}: {HF_CONFIG} has {key} = {value!r}; minipipe "
                               f"imports Llama with {key} = {allowed!r} only")
    absent = [key for key in SHAPE_KEYS.values() if not isinstance(config.get(key), int)]
    if absent:
        raise HFModelError(f"--init-from {directory}: {HF_CONFIG} lacks {', '.join(absent)}")
    wanted = {name: (config[key], key) for name, key in SHAPE_KEYS.items()}
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    if config.get("head_dim", head_dim) != head_dim:
        raise HFModelError(f"--init-from {directory}: {HF_CONFIG} has head_dim = {config['head_dim']}; "
                           f"minipipe imports Llama with head_dim = hidden_size / num_attention_heads "
                           f"= {head_dim} only")
    wanted.update(kv_heads=(kv_heads, "num_key_value_heads"),
                  rope_theta=(_rope(directory, config), "rope_theta"),
                  norm_eps=(float(config.get("rms_norm_eps", 1e-6)), "rms_norm_eps"),
                  attention_bias=(qwen2, "model_type"),  # Qwen2's q, k, v carry biases
                  tie_embeddings=(bool(config.get("tie_word_embeddings", False)), "tie_word_embeddings"))
    return wanted


def export_config(cfg) -> dict:
    """config.json of LlamaForCausalLM (Qwen2ForCausalLM with q/k/v biases) for a minipipe config."""
    qwen2 = bool(cfg.attention_bias)
    config = {"architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
              "model_type": "qwen2" if qwen2 else "llama",
              "vocab_size": cfg.vocab, "max_position_embeddings": cfg.max_seq_len,
              "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim,
              "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
              "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.d_model // cfg.heads,
              "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
              "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
              "rope_theta": cfg.rope_theta,  # what transformers before 5 read
              "attention_dropout": 0.0, "tie_word_embeddings": bool(cfg.tie_embeddings),
              "dtype": "float64" if cfg.dtype == "float64" else "float32"}
    if qwen2:
        config["use_sliding_window"] = False
    else:
        config.update(attention_bias=False, mlp_bias=False)
    return config


# ---- names -------------------------------------------------------------------------------------
def layer_names(cfg, index: int) -> dict:
    """Global layer `index`'s parameters: minipipe name -> (HF name, stored transposed)."""
    prefix = f"layers.{index}."
    if index == 0:
        return {prefix + "tokens.weight": ("model.embed_tokens.weight", False)}
    if index <= cfg.layers:
        return {prefix + name: (f"model.layers.{index - 1}.{hf}", False) for name, hf in BLOCK.items()
                if cfg.attention_bias or not name.endswith(".bias")}
    head = "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
    return {prefix + "norm.weight": ("model.norm.weight", False), prefix + "proj.weight": (head, False)}


def canonical(name: str) -> str | None:
    """A file's tensor name as layer_names writes it; None for a stored rotary buffer."""
    return None if name.endswith(ROTARY_BUFFER) else name
