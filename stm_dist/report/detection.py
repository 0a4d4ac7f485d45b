"""The detection part of a report: runs whose config has model.task detection, in the paper's
sizes x mixers COCO table (box AP / mask AP beside its Mask R-CNN 1x numbers), one row per run,
and their AP curves."""
from __future__ import annotations

import os

from . import paper
from .collect import RunSummary

DASH = "–"
CURVES = "coco_ap_curves.png"

RUN_COLUMNS = [
    ("run", "name", "{}"),
    ("model", "model", "{}"),
    ("mixer", lambda r: paper.mixer_title(r.mixer) if r.mixer else None, "{}"),
    ("schedule", "schedule", "{}"),
    ("data", "dataset", "{}"),
    ("status", "status", "{}"),
    ("steps", "steps", "{}"),
    ("final loss", "final_loss", "{:.4f}"),
    ("box AP", "bbox_AP", "{:.1f}"),
    ("mask AP", "segm_AP", "{:.1f}"),
    ("best box AP", "best_bbox_AP", "{:.1f}"),
    ("best mask AP", "best_segm_AP", "{:.1f}"),
    ("img/s", "img_s", "{:.1f}"),
    ("procs", "world_size", "{}"),
    ("paper box / mask", lambda r: None if r.paper_box_AP is None else f"{r.paper_box_AP:.1f} / {r.paper_mask_AP:.1f}",
     "{}"),
]


def _fmt(value, fmt: str) -> str:
    return DASH if value is None else fmt.format(value)


def _pair(box, mask) -> str:
    return DASH if box is None else f"{box:.1f}/{_fmt(mask, '{:.1f}')}"


def coco_table(runs: list[RunSummary]) -> list[str]:
    """Rows = sizes, columns = mixers; each cell: our best box/mask AP of 1x runs on COCO val2017 /
    the paper's. A cell with several runs shows the one of the best box AP and counts them."""
    cells: dict[tuple, list[RunSummary]] = {}
    for r in runs:
        if r.mixer and r.coco and r.schedule == "1x":
            cells.setdefault((r.size, r.mixer), []).append(r)
    mixers = [*paper.MIXERS, *sorted({m for _, m in cells} - set(paper.MIXERS))]
    sizes = [*paper.SIZES, *sorted({s for s, _ in cells} - set(paper.SIZES))]
    lines = ["| size | " + " | ".join(paper.mixer_title(m) for m in mixers) + " |", "|---|" + "---|" * len(mixers)]
    for size in sizes:
        row = []
        for mixer in mixers:
            here = [r for r in cells.get((size, mixer), []) if r.best_bbox_AP is not None]
            best = max(here, key=lambda r: r.best_bbox_AP) if here else None
            ours = _pair(best.best_bbox_AP, best.best_segm_AP) if best else DASH
            if len(cells.get((size, mixer), [])) > 1:
                ours += f" ({len(cells[(size, mixer)])} runs)"
            row.append(f"{ours} / {_pair(*(paper.PAPER_COCO.get((size, mixer)) or (None, None)))}")
        lines.append(f"| {paper.SIZE_TITLES.get(size, size)} | " + " | ".join(row) + " |")
    return lines


def runs_table(runs: list[RunSummary]) -> list[str]:
    lines = ["| " + " | ".join(h for h, _, _ in RUN_COLUMNS) + " |", "|" + "---|" * len(RUN_COLUMNS)]
    for r in runs:
        vals = [(a(r) if callable(a) else getattr(r, a)) for _, a, _ in RUN_COLUMNS]
        lines.append("| " + " | ".join(_fmt(v, f) for v, (_, _, f) in zip(vals, RUN_COLUMNS)) + " |")
    return lines


def markdown(runs: list[RunSummary], plots: list[str]) -> list[str]:
    others = sorted({f"{r.dataset} ({r.schedule})" for r in runs if not (r.coco and r.schedule == "1x")})
    note = ([f"{sum(1 for r in runs if not (r.coco and r.schedule == '1x'))} detection run(s) not compared with "
             "the paper (other data or another schedule): " + "; ".join(others) + ".", ""] if others else [])
    return [
        "## COCO box / mask AP by size and mixer (Mask R-CNN 1x, the paper's layout)",
        "",
        "Each cell: our best box AP / mask AP (COCO %, over all evaluations) of detection runs of the "
        "1x recipe (12 epochs, single scale) evaluated on COCO val2017 (80 categories, 5,000 images) / "
        "the paper's released Mask R-CNN 1x detectors.",
        "",
        *coco_table(runs),
        "",
        *note,
        "## Detection runs",
        "",
        "box/mask AP: the last evaluation; best: over all evaluations (best.pth is kept by box AP). "
        "schedule: 1x = 12 epochs at one scale, 3x ms = 36 epochs multi-scale.",
        "",
        *runs_table(runs),
        "",
        *[f"![{os.path.splitext(os.path.basename(p))[0]}]({os.path.basename(p)})" for p in plots],
        "",
    ]


def write_curves(runs: list[RunSummary], out_dir: str) -> list[str]:
    """coco_ap_curves.png: box AP and mask AP per evaluation (x: epochs done) of every detection
    run, with the paper's 1x numbers as dashed lines for the runs that stand beside them."""
    from .plots import DPI, _plt

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.0), dpi=DPI)
    plotted = False
    for i, r in enumerate(runs):
        pts = [(p["epoch"] + 1 if p.get("epoch") is not None else p["step"], p["bbox_AP"], p.get("segm_AP"))
               for p in r.ap_curve]
        if not pts:
            continue
        color, label = f"C{i % 10}", f"{r.name} ({r.schedule})"
        for ax, k, published in ((axes[0], 1, r.paper_box_AP), (axes[1], 2, r.paper_mask_AP)):
            ax.plot([p[0] for p in pts], [p[k] for p in pts], "o-", color=color, ms=3, label=label)
            if published is not None:
                ax.axhline(published, color=color, ls="--", lw=1, label=f"{label}: paper")
        plotted = True
    from matplotlib.ticker import MaxNLocator

    for ax, what in zip(axes, ("box AP", "mask AP")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"COCO {what} (%)")
        ax.grid(True, alpha=0.3)
        if not plotted:
            ax.text(0.5, 0.5, "no evaluations yet", ha="center", va="center", transform=ax.transAxes)
    if plotted:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, CURVES)
    fig.savefig(path)
    plt.close(fig)
    return [path]
