"""stm-sweep: expand a sweep file (models x overrides) into numbered runs.

    stm-sweep expand sweeps/paper.yaml            # table: index, model, run dir
    stm-sweep expand sweeps/paper.yaml --count    # just the number of runs (for --array=0-N-1)
    stm-sweep expand sweeps/paper.yaml --check    # also validate every run's config
    stm-sweep task sweeps/paper.yaml 7            # stm-train arguments of run 7, one per line
    stm-sweep task sweeps/paper.yaml 7 --field run_dir

slurm/sweep.sbatch calls `stm-sweep task SWEEP $SLURM_ARRAY_TASK_ID`.
"""
import argparse
import sys


def build_parser():
    p = argparse.ArgumentParser(prog="stm-sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("expand", help="list the runs of a sweep")
    e.add_argument("sweep")
    e.add_argument("--runs-root", default=None, help="default: $STM_RUNS_ROOT, the file's runs_root, 'runs'")
    e.add_argument("--count", action="store_true", help="print only the number of runs")
    e.add_argument("--check", action="store_true",
                   help="load every run's config with its overrides (catches typos before submitting)")
    t = sub.add_parser("task", help="the stm-train arguments of one run")
    t.add_argument("sweep")
    t.add_argument("index", type=int)
    t.add_argument("--runs-root", default=None)
    t.add_argument("--field", choices=("args", "run_dir", "model", "config"), default="args",
                   help="what to print (args: one stm-train argument per line)")
    return p


def _check(tasks) -> list[str]:
    from stm_dist.engine.config import ConfigError, load

    problems = []
    for t in tasks:
        try:
            load(t.config, t.overrides)
        except ConfigError as e:
            problems.append(f"run {t.index} ({t.model}): {e}")
    return problems


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from stm_dist.sweep import SweepError, load

    try:
        sweep = load(args.sweep)
        if args.cmd == "task":
            task = sweep.task(args.index, args.runs_root)
            if args.field == "args":
                print("\n".join(task.train_args()))
            else:
                print(getattr(task, args.field))
            return 0
        tasks = sweep.tasks(args.runs_root)
    except SweepError as e:
        print(f"stm-sweep: {e}", file=sys.stderr)
        return 2
    if args.count:
        print(len(tasks))
        return 0
    if args.check:
        problems = _check(tasks)
        if problems:
            print("stm-sweep: invalid run configs:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 2
    width = max(len(t.model) for t in tasks)
    for t in tasks:
        extra = " ".join(f"{k}={v}" for k, v in t.grid_values.items())
        print(f"{t.index:4d}  {t.model:<{width}}  {t.run_dir}  {extra}".rstrip())
    print(f"# {len(tasks)} runs: sbatch --array=0-{len(tasks) - 1} slurm/sweep.sbatch {args.sweep}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
