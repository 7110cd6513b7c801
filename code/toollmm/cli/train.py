"""Train one stage with DeepSpeed: setup → data → model → loop → save.

    bash scripts/train.sh --stage 3 [--config my.yaml ...] [key=value ...]

``scripts/train.sh`` runs this once per GPU under ``torchrun``, or as one plain process on a
single GPU or a CPU (the gloo backend). Config: the packaged ``base.yaml`` + ``stage_<N>.yaml``
+ ``--config`` layers (a YAML file, or a packaged config's name such as ``tiny``) + overrides;
see ``toollmm.config``.
The training itself is ``toollmm.recipe.TrainingRecipe``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from toollmm.config import ConfigError, load_config, packaged_configs
from toollmm.config_help import keys_help
from toollmm.recipe import TrainingDiverged, TrainingRecipe


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, epilog=keys_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, required=True, choices=[1, 2, 3],
                        help="1: encoder alignment, 2: decoder alignment, 3: instruction tuning")
    parser.add_argument("--config", action="append", default=[],
                        help=f"a YAML file, or a packaged config's name ({', '.join(packaged_configs())}), "
                             "layered over base + stage; repeatable")
    parser.add_argument("--resume", action="store_true", help="continue from the newest state in train.output_dir")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed's launcher
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=1")
    return parser.parse_intermixed_args(argv)  # --config may follow overrides


def main(argv: list[str] | None = None) -> Path:
    """``train`` with its expected failures (config, data, resume state, divergence) as a
    one-line message and exit status 1 instead of a traceback."""
    try:
        return train(argv)
    except (ConfigError, TrainingDiverged) as err:
        raise SystemExit(f"train: {err}") from None


def train(argv: list[str] | None = None) -> Path:
    """Train the stage the arguments name; returns the final checkpoint folder."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.stage, args.config, args.overrides + (["train.resume=true"] if args.resume else []))
    return TrainingRecipe(config).run()


if __name__ == "__main__":
    main()
