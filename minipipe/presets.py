"""Model size presets: plain data, no torch, so that the config (a leaf) can apply them.

A preset fills only the model fields the user left unset: `--preset small --layers 8` means
"small, but 8 layers". The keys of PRESETS are the model families (the --model choices).
"""

PRESETS = {
    "transformer": {
        "tiny": dict(layers=4, d_model=128, heads=4, max_seq_len=128),
        "small": dict(layers=6, d_model=384, heads=6, max_seq_len=256),
        # The GPipe paper's Transformer shape (Table 1: d_model 2048, d_ff 8192, 32 heads).
        "gpipe": dict(layers=24, d_model=2048, heads=32, max_seq_len=1024, vocab=32000),
    },
    "amoebanet": {
        "tiny": dict(cells=1, filters=8, image_size=32),
        "small": dict(cells=2, filters=32, image_size=32),
        # AmoebaNet-D(18, 256) at 224x224 (L = 3 groups x 6 normal cells), as in GPipe's image runs.
        "gpipe": dict(cells=6, filters=256, image_size=224, classes=1000),
    },
}
MODEL_FAMILIES = tuple(PRESETS)
PRESET_NAMES = tuple(dict.fromkeys(name for family in PRESETS.values() for name in family))


def preset_values(cfg) -> dict:
    """The preset's value of every model field the user left unset (a --model/--preset pair that
    exists: the config has checked both choices)."""
    values = {name: value for name, value in PRESETS[cfg.model][cfg.preset].items()
              if getattr(cfg, name) is None}
    if cfg.model == "transformer" and cfg.seq_len is None:
        values["seq_len"] = cfg.max_seq_len if cfg.max_seq_len is not None else values["max_seq_len"]
    return values
