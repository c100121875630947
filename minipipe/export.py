"""Consolidate a sharded checkpoint into one `model.safetensors` and its `config.json`.

    python -m minipipe.export out/ckpt exported/          # a --ckpt-dir (its latest) or a step-N
    cfg, model = models.load_exported("exported/")       # the whole model as one nn.Sequential

Every shard is verified against trainer_state.json (size, sha256) before it is read; tensor
names stay global (`layers.7.qkv.weight`).
"""
import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from minipipe.checkpoint_files import (
    checkpoint_path,
    read_index,
    read_tensors,
    read_trainer_state,
)
from minipipe.errors import MinipipeError

EXPORTED_WEIGHTS = "model.safetensors"
EXPORTED_CONFIG = "config.json"


def export(checkpoint, out_dir) -> Path:
    """Write out_dir/model.safetensors (every tensor of the model) and out_dir/config.json."""
    path = checkpoint_path(checkpoint)
    state = read_trainer_state(path)
    weight_map = read_index(path, "model", state)
    tensors = read_tensors(path, "model", weight_map, state, dict.fromkeys(weight_map))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / EXPORTED_WEIGHTS, metadata={"format": "pt", "step": str(state["step"])})
    (out / EXPORTED_CONFIG).write_text(json.dumps(state["config"], indent=1) + "\n")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="one model.safetensors + config.json from a checkpoint")
    parser.add_argument("checkpoint", help="a --ckpt-dir (its latest checkpoint) or a step-N directory")
    parser.add_argument("out_dir", help="where to write model.safetensors and config.json")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out_dir)
    except MinipipeError as err:
        print(f"minipipe error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out / EXPORTED_WEIGHTS} and {out / EXPORTED_CONFIG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
