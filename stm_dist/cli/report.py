"""stm-report: compare finished runs the way the paper does.

    stm-report runs/paper -o report/

Finds every run directory under RUNS_DIR (config.yaml + metrics.jsonl, as stm-train writes
them) and writes report/report.md (sizes x mixers table with the paper's published top-1, then
one row per run), report/report.json and three PNG plots (top-1 vs GFLOPs, top-1 vs
parameters, images/s per mixer).
"""
import argparse
import sys


def build_parser():
    p = argparse.ArgumentParser(prog="stm-report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs_dir", help="folder holding run directories (searched recursively)")
    p.add_argument("-o", "--out", default="report", help="output folder (default: report/)")
    p.add_argument("--no-complexity", action="store_true",
                   help="skip building each model to count parameters and GFLOPs")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from stm_dist.report import ReportError, collect_runs, write_report

    try:
        runs = collect_runs(args.runs_dir, count_complexity=not args.no_complexity)
    except ReportError as e:
        print(f"stm-report: {e}", file=sys.stderr)
        return 2
    paths = write_report(runs, args.out, source=args.runs_dir)
    for r in runs:
        if r.evals == 0:
            print(f"stm-report: note: {r.name} has no evaluation yet (status {r.status})", file=sys.stderr)
    print(f"{len(runs)} run(s) -> {paths['markdown']}, {paths['json']}, "
          + ", ".join(paths["plots"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
