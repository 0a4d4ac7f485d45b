"""Comparison report over finished runs: the paper's sizes x mixers table, plots, JSON.

    runs = collect_runs("runs/paper")          # one RunSummary per run directory
    write_report(runs, "report/")              # report.md, report.json, *.png
"""
from .collect import ReportError, RunSummary, collect_runs
from .write import write_report

__all__ = ["collect_runs", "write_report", "RunSummary", "ReportError"]
