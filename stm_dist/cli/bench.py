"""`stm-bench`: run one benchmark subcommand (models, op, data, train, ...).

Subcommands are the modules of `stm_dist.bench`; only the chosen one is imported, so
`stm-bench models` never loads DeepSpeed or DALI.
"""
import argparse
import importlib
import pkgutil
import sys

import stm_dist.bench as bench_pkg


def subcommands() -> list:
    return sorted(m.name for m in pkgutil.iter_modules(bench_pkg.__path__) if not m.name.startswith("_"))


def _top_parser(names) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stm-bench", description=__doc__.splitlines()[0],
                                epilog="`stm-bench <subcommand> --help` shows a subcommand's options.")
    p.add_argument("subcommand", choices=names, help="which benchmark to run")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = subcommands()
    top = _top_parser(names)
    if not argv or argv[0].startswith("-"):
        top.parse_args(argv or ["--help"])  # prints help (or the error) and exits
    name, rest = argv[0], argv[1:]
    if name not in names:
        top.error(f"unknown subcommand {name!r} (choose from {', '.join(names)})")
    mod = importlib.import_module(f"stm_dist.bench.{name}")
    doc = (mod.__doc__ or "").strip().splitlines()
    parser = argparse.ArgumentParser(prog=f"stm-bench {name}", description=doc[0] if doc else None)
    args = mod.add_arguments(parser).parse_args(rest)
    result = mod.run(args)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
