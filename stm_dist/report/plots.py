"""PNG plots of a report: top-1 vs GFLOPs, top-1 vs parameters, training throughput per mixer."""
from __future__ import annotations

import os

from . import paper
from .collect import RunSummary

FIGSIZE = (7.0, 4.5)   # inches
DPI = 100              # -> 700 x 450 pixels


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


def _group(runs: list[RunSummary]) -> dict[str, list[RunSummary]]:
    """Runs by mixer and data set: every line says what it was trained and evaluated on, and
    only ImageNet-1k runs carry the paper's points (paper_top1 is None for the others)."""
    one_dataset = len({r.dataset for r in runs}) == 1  # then the axes title names it, once
    groups: dict[str, list[RunSummary]] = {}
    for r in runs:
        title = paper.mixer_title(r.mixer) if r.mixer else r.model
        groups.setdefault(title if one_dataset else f"{title} [{r.dataset}]", []).append(r)
    return groups


def _data_title(ax, runs: list[RunSummary]):
    datasets = sorted({r.dataset for r in runs})
    if len(datasets) == 1:
        ax.set_title(f"data: {datasets[0]}", fontsize=9)


def _top1_vs(runs: list[RunSummary], attr: str, xlabel: str, path: str, scale: float = 1.0):
    plt = _plt()
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    plotted = False
    for i, (label, group) in enumerate(sorted(_group(runs).items())):
        pts = sorted((getattr(r, attr) / scale, r.best_any_top1, r.paper_top1) for r in group
                     if getattr(r, attr) is not None and r.best_any_top1 is not None)
        if not pts:
            continue
        color = f"C{i % 10}"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=f"{label} (ours)")
        published = [(p[0], p[2]) for p in pts if p[2] is not None]
        if published:
            ax.plot([p[0] for p in published], [p[1] for p in published], "s--", color=color,
                    mfc="none", label=f"{label} (paper)")
        plotted = True
    if not plotted:
        ax.text(0.5, 0.5, "no evaluated runs", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 (%)")
    ax.grid(True, alpha=0.3)
    if plotted:
        ax.legend(fontsize=7, ncol=2 if len(_group(runs)) > 3 else 1)
    _data_title(ax, runs)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _throughput(runs: list[RunSummary], path: str):
    plt = _plt()
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    bars = [(paper.mixer_title(r.mixer) if r.mixer else r.model, r.size or "", r.img_s) for r in runs
            if r.img_s is not None]
    order = {s: i for i, s in enumerate(paper.SIZES)}
    bars.sort(key=lambda b: (b[0], order.get(b[1], 99)))
    if bars:
        mixers = sorted({b[0] for b in bars})
        colors = {m: f"C{i % 10}" for i, m in enumerate(mixers)}
        ax.bar(range(len(bars)), [b[2] for b in bars], color=[colors[b[0]] for b in bars])
        ax.set_xticks(range(len(bars)), [f"{b[0]}\n{b[1]}" for b in bars], fontsize=7)
        for m in mixers:
            ax.bar([], [], color=colors[m], label=m)
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no training steps recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("training images/s (global, median over steps)")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_plots(runs: list[RunSummary], out_dir: str) -> list[str]:
    paths = [os.path.join(out_dir, n) for n in ("top1_vs_gflops.png", "top1_vs_params.png", "img_s_per_mixer.png")]
    _top1_vs(runs, "gflops", "GFLOPs (224 px)", paths[0])
    _top1_vs(runs, "params", "parameters (M)", paths[1], scale=1e6)
    _throughput(runs, paths[2])
    return paths
