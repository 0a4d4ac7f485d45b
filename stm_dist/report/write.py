"""report.md (the paper's sizes x mixers table, then every run), report.json, plots."""
from __future__ import annotations

import json
import os
import time

from . import paper
from .collect import RunSummary
from .plots import write_plots

DASH = "–"

# Columns of the per-run table: (header, RunSummary attribute or callable, format).
RUN_COLUMNS = [
    ("run", "name", "{}"),
    ("model", "model", "{}"),
    ("mixer", lambda r: paper.mixer_title(r.mixer) if r.mixer else None, "{}"),
    ("data", "dataset", "{}"),
    ("status", "status", "{}"),
    ("steps", "steps", "{}"),
    ("final loss", "final_loss", "{:.4f}"),
    ("top-1", "top1", "{:.2f}"),
    ("top-5", "top5", "{:.2f}"),
    ("top-1 EMA", "top1_ema", "{:.2f}"),
    ("top-5 EMA", "top5_ema", "{:.2f}"),
    ("best top-1", "best_top1", "{:.2f}"),
    ("best top-1 EMA", "best_top1_ema", "{:.2f}"),
    ("params (M)", lambda r: None if r.params is None else r.params / 1e6, "{:.3f}"),
    ("GFLOPs", "gflops", "{:.3f}"),
    ("img/s", "img_s", "{:.1f}"),
    ("procs", "world_size", "{}"),
    ("paper top-1", "paper_top1", "{:.1f}"),
]


def _fmt(value, fmt: str) -> str:
    return DASH if value is None else fmt.format(value)


def _value(run: RunSummary, attr):
    return attr(run) if callable(attr) else getattr(run, attr)


def paper_table(runs: list[RunSummary]) -> list[str]:
    """Rows = sizes, columns = mixers, as in the paper; only ImageNet-1k runs sit next to its
    numbers. When a cell has several runs (a grid sweep), the best one is shown and the count noted.
    Mixers and sizes outside the paper's (register_mixer) get their own columns / rows, with
    no published number."""
    cells: dict[tuple, list[RunSummary]] = {}
    for r in runs:
        if r.mixer and r.imagenet1k:
            cells.setdefault((r.size, r.mixer), []).append(r)
    extra_mixers = sorted({m for _, m in cells} - set(paper.MIXERS))
    extra_sizes = sorted({s for s, _ in cells} - set(paper.SIZES))
    mixers, sizes = [*paper.MIXERS, *extra_mixers], [*paper.SIZES, *extra_sizes]
    lines = ["| size | " + " | ".join(paper.mixer_title(m) for m in mixers) + " |",
             "|---|" + "---|" * len(mixers)]
    for size in sizes:
        row = []
        for mixer in mixers:
            here = cells.get((size, mixer), [])
            scored = [r.best_any_top1 for r in here if r.best_any_top1 is not None]
            ours = _fmt(max(scored) if scored else None, "{:.2f}")
            if len(here) > 1:
                ours += f" ({len(here)} runs)"
            row.append(f"{ours} / {_fmt(paper.PAPER_TOP1.get((size, mixer)), '{:.1f}')}")
        lines.append(f"| {paper.SIZE_TITLES.get(size, size)} | " + " | ".join(row) + " |")
    return lines


def _other_data_note(runs: list[RunSummary]) -> list[str]:
    other = sorted({r.dataset for r in runs if not r.imagenet1k})
    if not other:
        return []
    n = sum(1 for r in runs if not r.imagenet1k)
    return [f"{n} run(s) on other data, not compared with the paper: " + "; ".join(other) + ".", ""]


def runs_table(runs: list[RunSummary]) -> list[str]:
    lines = ["| " + " | ".join(h for h, _, _ in RUN_COLUMNS) + " |",
             "|" + "---|" * len(RUN_COLUMNS)]
    for r in runs:
        lines.append("| " + " | ".join(_fmt(_value(r, a), f) for _, a, f in RUN_COLUMNS) + " |")
    return lines


def write_report(runs: list[RunSummary], out_dir: str, source: str = "", analyses: dict | None = None) -> dict:
    """Write report.md, report.json and the PNG plots; return their paths. `analyses`: what
    report.analyses.collect_analyses found (stm-analyze outputs), compared side by side."""
    from . import detection
    from .analyses import analyses_json, analyses_markdown, write_analysis_figures

    os.makedirs(out_dir, exist_ok=True)
    all_runs = runs
    det_runs = [r for r in runs if r.task == "detection"]  # their own tables and curves, below
    runs = [r for r in runs if r.task != "detection"]
    pngs = write_plots(runs, out_dir) if runs else []
    det_pngs = detection.write_curves(det_runs, out_dir) if det_runs else []
    analysis_pngs = write_analysis_figures(analyses, out_dir) if analyses else []
    header = [
        "# Spatial token mixers: comparison report",
        "",
        f"{len(all_runs)} run(s){' from ' + source if source else ''}"
        + (f" ({len(det_runs)} detection)" if det_runs else "")
        + f", generated {time.strftime('%Y-%m-%d %H:%M:%S')}.",
        "",
    ]
    classification = [
        "## Top-1 by size and mixer (the paper's layout)",
        "",
        "Each cell: our best top-1 (%) over all evaluations, live or EMA weights, of runs "
        "evaluated on the ImageNet-1k val set (1000 classes, 50,000 images) / the paper's "
        "published ImageNet-1k top-1 (224 px, 300 epochs). Runs on other data are never put "
        "next to the paper's numbers; they are listed below with their data set.",
        "",
        *paper_table(runs),
        "",
        *_other_data_note(runs),
        "## All runs",
        "",
        "top-1/top-5: the last evaluation; best: over all evaluations. Parameters and GFLOPs are "
        "counted at 224 px with the run's number of classes (torch FlopCounterMode: conv, linear, "
        "matmul; 2 FLOPs per multiply-add, as spec §4). img/s: global training throughput, median "
        "over steps, on the machine that ran it. procs: world size of the newest checkpoint.",
        "",
        *runs_table(runs),
        "",
        "## Plots",
        "",
        *[f"![{os.path.splitext(os.path.basename(p))[0]}]({os.path.basename(p)})" for p in pngs],
        "",
    ]
    md = [
        *header,
        *(classification if runs or not det_runs else []),
        *(detection.markdown(det_runs, det_pngs) if det_runs else []),
        *(analyses_markdown(analyses, analysis_pngs) if analyses else []),
    ]
    md_path = os.path.join(out_dir, "report.md")
    with open(md_path, "w") as f:
        f.write("\n".join(md))
    json_path = os.path.join(out_dir, "report.json")
    with open(json_path, "w") as f:
        out = {"source": source, "runs": [r.to_dict() for r in all_runs]}
        if analyses:
            out["analyses"] = analyses_json(analyses)
        json.dump(out, f, indent=1)
    return {"markdown": md_path, "json": json_path, "plots": pngs + det_pngs + analysis_pngs}
