"""stm-report: compare finished runs the way the paper does.

    stm-report runs/paper -o report/

Finds every run directory under RUNS_DIR (config.yaml + metrics.jsonl, as stm-train writes
them) and writes report/report.md (sizes x mixers table with the paper's published top-1 for
runs on ImageNet-1k, then one row per run with its data set), report/report.json and three PNG
plots (top-1 vs GFLOPs, top-1 vs parameters, images/s per mixer).

Detection runs (model.task detection) get their own part: a sizes x mixers table of COCO box /
mask AP with the paper's Mask R-CNN 1x numbers beside runs of the 1x recipe on COCO val2017,
one row per detection run (schedule, data, last and best AP) and coco_ap_curves.png (AP per
evaluation).

stm-analyze outputs (invariance_*.json, erf.json, robustness.json) found under RUNS_DIR, or
under --analyses DIR, add the paper's comparison of the mixers: one figure per analysis with
the models side by side, and their numbers and provenance in report.md and report.json.
Results measured with different settings (data, image size, image count, crop, PGD settings)
are never mixed: each set of settings is a separate group with its own table and figure, and a
note on stderr names the setting that differs and the files.
"""
import argparse
import os
import sys


def build_parser():
    p = argparse.ArgumentParser(prog="stm-report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs_dir", help="folder holding run directories (searched recursively)")
    p.add_argument("-o", "--out", default="report", help="output folder (default: report/)")
    p.add_argument("--analyses", default=None,
                   help="folder of stm-analyze outputs (searched recursively; default: RUNS_DIR)")
    p.add_argument("--no-complexity", action="store_true",
                   help="skip building each model to count parameters and GFLOPs")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from stm_dist.report import ReportError, collect_runs, write_report
    from stm_dist.report.analyses import collect_analyses, has_results

    analyses = collect_analyses(args.analyses or args.runs_dir)
    has_analyses = has_results(analyses)
    if args.analyses and not os.path.isdir(args.analyses):
        print(f"stm-report: analyses directory not found: {args.analyses}", file=sys.stderr)
        return 2
    try:
        runs = collect_runs(args.runs_dir, count_complexity=not args.no_complexity)
    except ReportError as e:
        # a folder of analyses alone is a report too; anything else wrong is an error
        if not (has_analyses and str(e).startswith("no run directories")):
            print(f"stm-report: {e}", file=sys.stderr)
            return 2
        runs = []
    for note in analyses["notes"]:
        print(f"stm-report: note: {note}", file=sys.stderr)
    paths = write_report(runs, args.out, source=args.runs_dir, analyses=analyses if has_analyses else None)
    for r in runs:
        if r.evals == 0:
            print(f"stm-report: note: {r.name} has no evaluation yet (status {r.status})", file=sys.stderr)
    print(f"{len(runs)} run(s) -> {paths['markdown']}, {paths['json']}, "
          + ", ".join(paths["plots"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
