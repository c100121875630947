"""Hugging Face GPT-2 <-> minipipe's Transformer: the config, and every tensor's name and layout,
both ways: a converter for minipipe/checkpoint/hf_format.py, which reads and writes the files
(and checks them: containment, the config's types and ranges, sizes, dtypes, finite values).

    import:  train.py --init-from DIR      (--model transformer, the default)
    export:  python -m minipipe.export CKPT OUT --format hf

Correspondence (global layer i of [Embedding, Block x L, Head]; GPT-2's Conv1D stores a linear's
weight as (in, out), the transpose of nn.Linear's):
    layers.0.tokens.weight / positions.weight   transformer.wte.weight / wpe.weight
    layers.{b+1}.ln_attn, ln_mlp                transformer.h.{b}.ln_1, ln_2
    layers.{b+1}.qkv                            transformer.h.{b}.attn.c_attn   (T; q, k, v in order)
    layers.{b+1}.attn_proj, fc, mlp_proj        ...attn.c_proj, mlp.c_fc, mlp.c_proj  (T)
    layers.{L+1}.ln                             transformer.ln_f
    layers.{L+1}.proj.weight                    lm_head.weight, or wte when tie_word_embeddings
Files without the `transformer.` prefix (the original hub checkpoints) read the same; GPT-2's
causal-mask buffers (`attn.bias`, `attn.masked_bias`) are not weights and are skipped.
"""
import json

NAME = "GPT-2"
MODEL_TYPES = ("gpt2",)
# minipipe shape field -> GPT-2 config key (all required)
SHAPE_KEYS = {"layers": "n_layer", "d_model": "n_embd", "heads": "n_head",
              "max_seq_len": "n_positions", "vocab": "vocab_size"}
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # both are 0.5 x (1 + tanh(...)), as minipipe's
LAYER_NORM_EPS = 1e-5  # models.transformer.LayerNorm's
BLOCK = {  # Block parameter -> (GPT-2 name under transformer.h.{b}., stored transposed)
    "ln_attn.weight": ("ln_1.weight", False), "ln_attn.bias": ("ln_1.bias", False),
    "qkv.weight": ("attn.c_attn.weight", True), "qkv.bias": ("attn.c_attn.bias", False),
    "attn_proj.weight": ("attn.c_proj.weight", True), "attn_proj.bias": ("attn.c_proj.bias", False),
    "ln_mlp.weight": ("ln_2.weight", False), "ln_mlp.bias": ("ln_2.bias", False),
    "fc.weight": ("mlp.c_fc.weight", True), "fc.bias": ("mlp.c_fc.bias", False),
    "mlp_proj.weight": ("mlp.c_proj.weight", True), "mlp_proj.bias": ("mlp.c_proj.bias", False),
}
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
BLOCK_PREFIX = "transformer.h."  # block b's tensors: transformer.h.{b}.*
FIRST_BLOCK_TENSOR = "ln_1.weight"


# ---- config ------------------------------------------------------------------------------------
def read_config(config: dict, refuse) -> dict:
    """{Config field: (value, config.json key)} from a config.json whose sizes, model_type and tie
    hf_format has checked; the rest of GPT-2's schema is checked here by type and range, refused
    (refuse(key, what)) unless it describes GPT-2 math minipipe computes exactly."""
    if config.get("activation_function", "gelu_new") not in TANH_GELUS:
        refuse("activation_function", f"activation_function one of {TANH_GELUS}")
    eps = config.get("layer_norm_epsilon", LAYER_NORM_EPS)
    if isinstance(eps, bool) or eps != LAYER_NORM_EPS:
        refuse("layer_norm_epsilon", f"layer_norm_epsilon = {LAYER_NORM_EPS} only")
    n_inner = config.get("n_inner")
    if n_inner is not None and (isinstance(n_inner, bool) or n_inner != 4 * config["n_embd"]):
        refuse("n_inner", f"n_inner null or 4 x n_embd = {4 * config['n_embd']}")
    for key, value in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
        if config.get(key, value) is not value:  # `is`: 1 == True would pass an equality test
            refuse(key, f"{key} = {json.dumps(value)} only")
    if config["n_embd"] % config["n_head"]:
        refuse("n_embd", f"n_embd divisible by n_head = {config['n_head']}")
    wanted = {name: (config[key], key) for name, key in SHAPE_KEYS.items()}
    # GPT2Config's default ties the head
    wanted["tie_embeddings"] = (config.get("tie_word_embeddings", True), "tie_word_embeddings")
    return wanted


def size_claims(config: dict) -> dict:
    """{GPT-2 tensor name: (what, the shape config.json implies)}, checked against the headers of
    the file that holds the embeddings before any model is built."""
    return {"transformer.wte.weight": ("vocab_size x n_embd", [config["vocab_size"], config["n_embd"]]),
            "transformer.wpe.weight": ("n_positions x n_embd", [config["n_positions"], config["n_embd"]])}


GPT2_EOT = 50256  # GPT-2's <|endoftext|>, its bos and eos


def export_config(cfg) -> dict:
    """config.json of GPT2LMHeadModel for a minipipe Transformer config."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab, "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model,
            "n_layer": cfg.layers, "n_head": cfg.heads, "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": LAYER_NORM_EPS,
            "embd_pdrop": cfg.dropout, "resid_pdrop": cfg.dropout,
            "attn_pdrop": 0.0,  # minipipe has no dropout on attention probabilities
            "tie_word_embeddings": bool(cfg.tie_embeddings),
            # GPT2Config's defaults name GPT-2's <|endoftext|> (50256); a smaller vocabulary
            # (bytes) has no such token, and an id past the vocabulary is invalid
            **dict.fromkeys(("bos_token_id", "eos_token_id"), GPT2_EOT if cfg.vocab > GPT2_EOT else None),
            "dtype": "float64" if cfg.dtype == "float64" else "float32"}


# ---- names -------------------------------------------------------------------------------------
def layer_names(cfg, index: int) -> dict:
    """Global layer `index`'s parameters: minipipe name -> (GPT-2 name, stored transposed)."""
    prefix = f"layers.{index}."
    if index == 0:
        return {prefix + "tokens.weight": ("transformer.wte.weight", False),
                prefix + "positions.weight": ("transformer.wpe.weight", False)}
    if index <= cfg.layers:
        return {prefix + name: (f"transformer.h.{index - 1}.{hf}", t) for name, (hf, t) in BLOCK.items()}
    head = "transformer.wte.weight" if cfg.tie_embeddings else "lm_head.weight"
    return {prefix + "ln.weight": ("transformer.ln_f.weight", False),
            prefix + "ln.bias": ("transformer.ln_f.bias", False), prefix + "proj.weight": (head, False)}


def canonical(name: str) -> str | None:
    """A file's tensor name as layer_names writes it; None for the causal-mask buffers."""
    if name.endswith(MASK_BUFFERS):
        return None
    return name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name
