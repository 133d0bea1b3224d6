"""Make a model folder to try the plugin on: the engine's embedded default model
(a 4M-parameter Llama) relabelled as `MyLlamaForCausalLM`, with a `logit_scale`.

    python examples/my-model-plugin/make_tiny_model.py /tmp/my-model [--logit-scale 0.5]
    engine --plugin-dir examples/my-model-plugin generate /tmp/my-model --prompt "def add("

Without the plugin, the engine refuses the folder and names the architecture.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from engine.engine_args import default_model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder to create")
    parser.add_argument("--logit-scale", type=float, default=1.0,
                        help="multiplies the logits (1.0: the same text as the default model)")
    args = parser.parse_args()
    shutil.copytree(default_model_dir(), args.out, dirs_exist_ok=True)
    config_path = args.out / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = ["MyLlamaForCausalLM"]
    config["logit_scale"] = args.logit_scale
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
