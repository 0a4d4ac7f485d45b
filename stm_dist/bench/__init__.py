"""Benchmarks behind `stm-bench <subcommand>`: one module per subcommand.

A subcommand module `stm_dist/bench/<name>.py` provides `add_arguments(parser) -> parser` and
`run(args)`; its docstring's first line is the help text. `stm_dist.cli.bench` finds the modules
by name and imports only the one asked for.
"""
