"""Command line: ``accelerate launch lfme_fast/train.py --config CONFIG [--output-dir DIR] [key=value ...]``.

``lfme-train ...`` (console script), ``python lfme_fast/train.py ...`` and ``python -m lfme_fast.train ...`` run
the same on one process. ``--help`` lists every config key with its default (from the config dataclasses).
A config, data or argument error is one line on stderr and exit code 2 (``--debug`` shows the traceback).
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

__all__ = ["main", "parse_args", "build_parser", "run"]


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (``PROG: error: ...``), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _help_epilog() -> str:
    from lfme_fast.config import config_help

    return ("examples:\n"
            "  lfme-train --config configs/smoke.yaml data.root=data/fmnist_lt_ir100\n"
            "  accelerate launch lfme_fast/train.py --config configs/imagenet_lt/lfme.yaml optim.epochs=2\n\n"
            + config_help())


def build_parser(with_keys: bool = True) -> argparse.ArgumentParser:
    """The ``lfme-train`` parser; ``with_keys`` adds every config key with its default to ``--help`` (it
    imports the registered recipes, so parsing alone leaves it out)."""
    parser = _OneLineParser(
        prog="lfme-train",
        description="Train and evaluate one experiment (one YAML config). Overrides are section.key=value, the "
                    "value parsed as YAML, e.g. data.root=data/fmnist_lt optim.epochs=2 "
                    "experts.thresholds=[1000,200]. Config, data and argument errors are one line on stderr "
                    "with exit code 2; nothing is written to the run folder before the checks pass.",
        epilog=_help_epilog() if with_keys else None, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file (configs/<dataset>/<recipe>.yaml)")
    parser.add_argument("--output-dir", help="run folder (overrides output_dir; default runs/<name>)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a config or data error")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (keys below)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``--help`` lists every config key with its default."""
    argv = list(sys.argv[1:] if argv is None else argv)
    wants_help = any(a in ("-h", "--help") for a in argv)
    return build_parser(with_keys=wants_help).parse_intermixed_args(argv)


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user fixes in the config, the data or the environment (reported in one line)."""
    from lfme_fast.config import ConfigError
    from lfme_fast.export import ExportError
    from lfme_fast.recipes import RecipeNotFound
    from lfme_fast.shards import DataError, DatasetLayoutError

    return ConfigError, DataError, DatasetLayoutError, RecipeNotFound, ExportError


def main(argv: Sequence[str] | None = None) -> int:
    """``lfme-train``: returns the exit code (0 done, 2 a config, data or argument error)."""
    args = parse_args(argv)
    try:
        return _main(args)
    except _user_errors() as exc:
        if args.debug:
            raise
        print(f"lfme-train: error: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    from lfme_fast.config import ConfigError, config_to_dict, load_config
    from lfme_fast.recipes import get_recipe

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={json.dumps(str(args.output_dir))}")
    try:
        cfg = load_config(args.config, overrides)
    except FileNotFoundError as exc:  # only the config file itself can be missing here
        raise ConfigError(str(exc)) from None
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    recipe = get_recipe(cfg.recipe)(cfg)
    recipe.setup()  # every check; the run folder is written only when they pass
    recipe.run_stages()  # errors from here on are bugs or failures of a running job: full traceback
    return 0


if __name__ == "__main__":
    # Delegate to the package module so there is one copy of the recipe registry (this file also runs
    # as __main__).
    from lfme_fast.train import main as _package_main

    sys.exit(_package_main())
