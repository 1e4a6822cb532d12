"""Dispatch ``python -m lfme_fast.bench <name> [args]`` to ``lfme_fast.bench.<name>.main(args)``."""

import importlib
import sys

BENCHMARKS = ("sampler", "loader", "train", "step")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        print(f"usage: python -m lfme_fast.bench {{{','.join(BENCHMARKS)}}} [options]", file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    module = importlib.import_module(f"lfme_fast.bench.{argv[0]}")
    module.main(argv[1:])


if __name__ == "__main__":
    main()
