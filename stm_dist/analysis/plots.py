"""PNG figures of the analyses: one model's result (stm-analyze) or several side by side
(stm-report). Every function takes the JSON-shaped results the analyses write. Each PNG carries
its titles, axis labels and legend as text (PNG "Description"), so what a figure claims can be
read without looking at it."""
from __future__ import annotations

import numpy as np

FIGSIZE = (7.0, 4.5)
DPI = 100

# results written before level_name was recorded
LEVEL_LABELS = {"translation": "crop-window offset (px per axis; not the content's displacement)",
                "pre_rotation": "rotation before the centre crop (degrees)",
                "post_rotation": "rotation after the centre crop (degrees)", "scale": "crop ratio"}
ROBUSTNESS_PANELS = ("top-1 (%) under attack at each budget alone (per eps)",
                     "accumulated: correct on clean and on every attack with budget <= eps (depends on the eps list)")


def level_label(result: dict) -> str:
    """The x axis of an invariance result: what its levels are."""
    return result.get("level_name") or LEVEL_LABELS.get(result.get("type"), "level")


def invariance_title(result: dict) -> str:
    prec = result.get("precision", "fp32")
    return f"invariance: {result.get('type', '?')} ({prec}; the original evaluated with AMP)"


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


def _texts(fig) -> str:
    out = [t.get_text() for t in fig.texts]  # the suptitle is one of them
    for ax in fig.axes:
        out += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        legend = ax.get_legend()
        if legend is not None:
            out += [t.get_text() for t in legend.get_texts()]
    return "\n".join(t for t in out if t)


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, metadata={"Description": _texts(fig)})
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
    first = results[0] if results else {"type": "translation"}
    label = level_label(first)
    for ax, what in zip(axes, ("top-1 (%)", "consistency with the standard view (%)")):
        ax.set_xlabel(label if len(label) < 60 else label.split(" (")[0] + " (px per axis)")
        ax.set_ylabel(what)
        ax.grid(True, alpha=0.3)
    shifts = [lv.get("content_shift_px") for lv in first.get("levels", [])]
    if shifts and all(v is not None for v in shifts):  # the same offsets, as content displacement
        top = axes[0].secondary_xaxis("top", functions=(
            lambda o: np.interp(o, [lv["level"] for lv in first["levels"]], shifts),
            lambda d: np.interp(d, shifts, [lv["level"] for lv in first["levels"]])))
        top.set_xlabel("content shift on the shorter side (px)", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.suptitle(invariance_title(first), fontsize=9)
    fig.text(0.5, 0.005, label, ha="center", va="bottom", fontsize=6)
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
    """Top-1 vs eps (in /255 units), FGSM dashed, PGD solid, one colour per result: left the
    headline (each eps alone), right the accumulated curve, titled as such."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(FIGSIZE[0] * 1.6, FIGSIZE[1]), dpi=DPI, sharey=True)
    for ax, key, title in zip(axes, ("acc1", "acc1_accumulated"), ROBUSTNESS_PANELS):
        for i, r in enumerate(results):
            name = labels[i] if labels else r["model"]
            for attack, style in (("pgd", "o-"), ("fgsm", "s--")):
                pts = sorted((a["eps"] * 255, a[key]) for a in r["attacks"] if a["attack"] == attack and key in a)
                if pts:
                    ax.plot(*zip(*pts), style, ms=4, color=f"C{i % 10}", label=f"{name} {attack.upper()}")
        ax.set_title(title if len(title) < 60 else "accumulated over budgets <= eps (depends on the eps list)",
                     fontsize=8)
        ax.set_xlabel("eps (x 1/255, l_inf, pixels in [0, 1])")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("top-1 under attack (%)")
    axes[0].legend(fontsize=7, ncol=2)
    fig.text(0.5, 0.005, ROBUSTNESS_PANELS[1], ha="center", va="bottom", fontsize=6)
    return _save(fig, path)
