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
bias (Llama's attention_bias), a head_dim other than hidden_size / num_attention_heads. The
file checks (containment, types and ranges, sizes against the headers, dtypes, finite values) are
hf_format's, shared with GPT-2.
"""
import math

NAME = "Llama"
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
BLOCK_PREFIX = "model.layers."  # block b's tensors: model.layers.{b}.*
FIRST_BLOCK_TENSOR = "input_layernorm.weight"


def _number(value) -> bool:
    """A finite positive JSON number (not a bool)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)


def _rope(config: dict, refuse) -> float:
    """rope_theta, after refusing any scaled rotary embedding: transformers 5 writes
    rope_parameters {rope_type, rope_theta}, older files rope_theta and rope_scaling."""
    for key in ("rope_parameters", "rope_scaling"):
        if not isinstance(config.get(key) or {}, dict):
            refuse(key, f"{key} an object or null")
    parameters = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kinds = (parameters.get("rope_type"), scaling.get("rope_type"), scaling.get("type"))
    kind = next((kind for kind in kinds if kind not in (None, "default")), "default")
    if kind != "default":
        key = "rope_parameters" if parameters.get("rope_type") not in (None, "default") else "rope_scaling"
        refuse(key, f"the default rotary embedding only (a rope type {kind!r} is not computed; no "
                    f"rope_scaling)")
    theta = parameters.get("rope_theta", config.get("rope_theta", 10000.0))
    if not _number(theta):
        refuse("rope_parameters" if "rope_theta" in parameters else "rope_theta",
               "rope_theta a finite number > 0")
    return float(theta)


def read_config(config: dict, refuse) -> dict:
    """{Config field: (value, config.json key)} from a config.json whose sizes, model_type and tie
    hf_format has checked; the rest of Llama's schema is checked here by type and range, refused
    (refuse(key, what)) unless it describes Llama math minipipe computes exactly."""
    qwen2 = config["model_type"] == "qwen2"
    if config.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "hidden_act = 'silu' only")
    # `is`: 0 == False would pass an equality test. Llama's attention_bias also gives o_proj a
    # bias, which minipipe's Block has not
    for key in ("mlp_bias", "attention_bias", "use_sliding_window"):
        if config.get(key, False) is not False:
            refuse(key, f"{key} = false only")
    layer_types = config.get("layer_types")
    if layer_types is not None and not (isinstance(layer_types, list)
                                        and all(kind == "full_attention" for kind in layer_types)):
        refuse("layer_types", "layer_types all 'full_attention' only (no sliding windows)")
    heads = config["num_attention_heads"]
    if config["hidden_size"] % heads:
        refuse("hidden_size", f"hidden_size divisible by num_attention_heads = {heads}")
    kv_heads = config.get("num_key_value_heads")
    if kv_heads is None:
        kv_heads = heads
    elif not (isinstance(kv_heads, int) and not isinstance(kv_heads, bool) and 1 <= kv_heads <= heads
              and heads % kv_heads == 0):
        refuse("num_key_value_heads", f"num_key_value_heads an integer dividing num_attention_heads = {heads}")
    head_dim = config["hidden_size"] // heads
    given = config.get("head_dim")
    if given is not None and (isinstance(given, bool) or given != head_dim):
        refuse("head_dim", f"head_dim = hidden_size / num_attention_heads = {head_dim} only")
    eps = config.get("rms_norm_eps", 1e-6)
    if not (_number(eps) and eps < 1):
        refuse("rms_norm_eps", "rms_norm_eps a number in (0, 1)")
    wanted = {name: (config[key], key) for name, key in SHAPE_KEYS.items()}
    wanted.update(kv_heads=(kv_heads, "num_key_value_heads"),
                  rope_theta=(_rope(config, refuse), "rope_theta"),
                  norm_eps=(float(eps), "rms_norm_eps"),
                  attention_bias=(qwen2, "model_type"),  # Qwen2's q, k, v carry biases
                  tie_embeddings=(config.get("tie_word_embeddings", False), "tie_word_embeddings"))
    return wanted


def size_claims(config: dict) -> dict:
    """{HF tensor name: (what, the shape config.json implies)}, checked against the headers of
    the file that holds the embeddings before any model is built."""
    return {"model.embed_tokens.weight": ("vocab_size x hidden_size",
                                          [config["vocab_size"], config["hidden_size"]])}


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
