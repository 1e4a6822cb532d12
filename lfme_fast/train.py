"""Command line: ``accelerate launch lfme_fast/train.py --config CONFIG [--output-dir DIR] [key=value ...]``.

``python lfme_fast/train.py ...`` and ``python -m lfme_fast.train ...`` run the same on one process.
This file is the command line only: the config is read by :mod:`lfme_fast.config`, the recipe named by
its ``recipe`` key comes from :mod:`lfme_fast.recipes` (one module per method) and runs its stages.

Run folder (every recipe)::

    RUN/config.yaml            the resolved config (every key, after overrides)
    RUN/<stage>/               one folder per training stage: log.jsonl, checkpoints/, model.pt, done.json
    RUN/eval/done.json         eval stage marker
    RUN/metrics.json           test metrics (overall, per subset with the convention named, per class)
    RUN/metrics.md             the same as markdown tables
    RUN/per_class_accuracy.png per-class accuracy against training frequency

Every stage records a fingerprint of the config keys it depends on in its ``done.json``; a stage whose
outputs exist with the same fingerprint is skipped, and an interrupted stage resumes from its latest
checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run by path (``accelerate launch lfme_fast/train.py``): Python put lfme_fast/ itself first on
    # sys.path, where its modules (io.py, config.py, ...) would shadow top-level names. Put the
    # repository root there instead so ``import lfme_fast`` works without installation.
    _root = str(Path(__file__).resolve().parents[1])
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path[0] = _root
    elif _root not in sys.path:
        sys.path.insert(0, _root)

import argparse
import json
from typing import Sequence

from lfme_fast.recipes import run

__all__ = ["main", "parse_args", "run"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lfme_fast/train.py",
        description="Train and evaluate one experiment. Overrides are section.key=value (value parsed as YAML), "
                    "e.g. data.root=data/fmnist_lt optim.epochs=2 experts.thresholds=[1000,200].")
    parser.add_argument("--config", required=True, help="YAML file in configs/")
    parser.add_argument("--output-dir", help="run folder (overrides output_dir; default runs/<name>)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from lfme_fast.config import config_to_dict, load_config

    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={json.dumps(str(args.output_dir))}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    run(cfg)
    return 0


if __name__ == "__main__":
    # Delegate to the package module so there is one copy of the recipe registry (this file also runs
    # as __main__).
    from lfme_fast.train import main as _main

    sys.exit(_main())
