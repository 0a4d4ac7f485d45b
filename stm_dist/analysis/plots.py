"""PNG figures of the analyses: one model's result (stm-analyze) or several side by side
(stm-report). Every function takes the JSON-shaped results the analyses write."""
from __future__ import annotations

import numpy as np

FIGSIZE = (7.0, 4.5)
DPI = 100

LEVEL_LABELS = {"translation": "jitter strength (pixels)", "pre_rotation": "rotation before crop (degrees)",
                "post_rotation": "rotation after crop (degrees)", "scale": "crop ratio"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path)
    _plt().close(fig)
    return path


def invariance_figure(results: list[dict], path: str, labels: list[str] | None = None) -> str:
    """acc1 (left) and consistency (right) vs level, one line per result (all of one type)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(FIGSIZE[0] * 1.4, FIGSIZE[1]), dpi=DPI)
    for i, r in enumerate(results):
        x = [lv["level"] for lv in r["levels"]]
        name = labels[i] if labels else r["model"]
        axes[0].plot(x, [lv["acc1"] for lv in r["levels"]], "o-", ms=3, color=f"C{i % 10}", label=name)
        axes[1].plot(x, [lv["consistency"] for lv in r["levels"]], "o-", ms=3, color=f"C{i % 10}", label=name)
    kind = results[0]["type"] if results else "translation"
    for ax, what in zip(axes, ("top-1 (%)", "consistency with the standard view (%)")):
        ax.set_xlabel(LEVEL_LABELS.get(kind, "level"))
        ax.set_ylabel(what)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"invariance: {kind}")
    return _save(fig, path)


def erf_figure(maps: list[np.ndarray], titles: list[str], path: str) -> str:
    """Log-scaled ERF heatmaps side by side: log10(1 + map / max * 1000), as a [0, 1] image, so
    faint contributions stay visible and models of any gradient scale compare on one colour map."""
    plt = _plt()
    n = max(1, len(maps))
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 3.0), dpi=DPI, squeeze=False)
    for ax, m, t in zip(axes[0], maps, titles):
        m = np.asarray(m, dtype=np.float64)
        scaled = np.log10(1 + 1000 * m / m.max()) / 3 if m.max() > 0 else m
        ax.imshow(scaled, cmap="RdYlGn", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(t, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)


def robustness_figure(results: list[dict], path: str, labels: list[str] | None = None) -> str:
    """Top-1 vs eps (in /255 units), FGSM dashed, PGD solid, one colour per result."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    for i, r in enumerate(results):
        name = labels[i] if labels else r["model"]
        for attack, style in (("pgd", "o-"), ("fgsm", "s--")):
            pts = sorted((a["eps"] * 255, a["acc1"]) for a in r["attacks"] if a["attack"] == attack)
            if pts:
                ax.plot(*zip(*pts), style, ms=4, color=f"C{i % 10}", label=f"{name} {attack.upper()}")
    ax.set_xlabel("eps (x 1/255, l_inf, pixels in [0, 1])")
    ax.set_ylabel("top-1 under attack (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)
