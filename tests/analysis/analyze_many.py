"""Run several stm-analyze command lines in one process (plainly or under torchrun), each through
the CLI's own parser, checks and run(): one launch instead of one per analysis, because each
launch costs seconds of imports on the 2-core CI box.

    python analyze_many.py '[["erf", "--model", ...], ["robustness", ...]]'
"""
import json
import sys

from stm_dist.cli.analyze import build_parser, run
from stm_dist.engine.distributed import finish

if __name__ == "__main__":
    for argv in json.loads(sys.argv[1]):
        run(build_parser().parse_args(argv))
    finish(0)
