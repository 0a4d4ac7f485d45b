"""The analyses (stm-analyze outputs) of several models in the report: the paper's comparison of
the mixers side by side, one figure per analysis, and their numbers for report.md/report.json.

An analysis output is a JSON file stm-analyze wrote: invariance_<type>.json, erf.json (with its
erf_map.npy beside it) or robustness.json, each holding the "model" it measured.
"""
from __future__ import annotations

import json
import os

import numpy as np

from . import paper

FILES = ("erf.json", "robustness.json")


def _title(model: str) -> str:
    ms = paper.mixer_and_size(model)
    return f"{paper.mixer_title(ms[0])} {ms[1]}" if ms else model


def _order(model: str):
    return paper.order_key(model)


def collect_analyses(root: str) -> dict:
    """{"invariance": {type: [result]}, "erf": [result], "robustness": [result]} under `root`,
    each list in the paper's mixer order; a result gets "name" (its figure label) and "dir"."""
    found: dict = {"invariance": {}, "erf": [], "robustness": []}
    if not os.path.isdir(root):
        return found
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("checkpoints", "checkpoints_universal", "tensorboard"))
        for f in sorted(files):
            if not (f in FILES or (f.startswith("invariance_") and f.endswith(".json"))):
                continue
            try:
                with open(os.path.join(here, f)) as fh:
                    r = json.load(fh)
            except (OSError, ValueError):
                continue  # not ours, or torn: the report lists what it could read
            if not isinstance(r, dict) or "model" not in r:
                continue
            r["dir"], r["_abs_dir"] = os.path.relpath(here, root), here
            if f.startswith("invariance_"):
                found["invariance"].setdefault(r.get("type", f[11:-5]), []).append(r)
            else:
                found[f[:-5]].append(r)
    groups = list(found["invariance"].values()) + [found["erf"], found["robustness"]]
    for group in groups:
        group.sort(key=lambda r: (_order(r["model"]), r["dir"]))
        models = [r["model"] for r in group]
        for r in group:  # the same model analysed twice (e.g. two runs): tell them apart
            r["name"] = _title(r["model"]) + (f" ({r['dir']})" if models.count(r["model"]) > 1 else "")
    return found


def write_analysis_figures(found: dict, out_dir: str) -> list[str]:
    from stm_dist.analysis import plots

    paths = []
    for kind, results in sorted(found["invariance"].items()):
        paths.append(plots.invariance_figure(results, os.path.join(out_dir, f"invariance_{kind}_compare.png"),
                                             labels=[r["name"] for r in results]))
    maps = []
    for r in found["erf"]:
        path = os.path.join(r["_abs_dir"], "erf_map.npy")
        maps.append((r, np.load(path)) if os.path.isfile(path) else (r, None))
    shown = [(r, m) for r, m in maps if m is not None]
    if shown:
        paths.append(plots.erf_figure([m for _, m in shown], [r["name"] for r, _ in shown],
                                      os.path.join(out_dir, "erf_compare.png")))
    if found["robustness"]:
        paths.append(plots.robustness_figure(found["robustness"], os.path.join(out_dir, "robustness_compare.png"),
                                             labels=[r["name"] for r in found["robustness"]]))
    return paths


def analyses_json(found: dict) -> dict:
    keep = ("model", "dir", "num_images", "img_size", "world_size", "seconds")
    return {
        "invariance": {k: [{**{x: r.get(x) for x in keep}, "standard": r["standard"], "levels": r["levels"]}
                           for r in v] for k, v in sorted(found["invariance"].items())},
        "erf": [{**{x: r.get(x) for x in keep}, "area_ratio": r["area_ratio"]} for r in found["erf"]],
        "robustness": [{**{x: r.get(x) for x in keep}, "clean_acc1": r["clean_acc1"], "attacks": r["attacks"]}
                       for r in found["robustness"]],
    }


def analyses_markdown(found: dict, pngs: list[str]) -> list[str]:
    if not (found["invariance"] or found["erf"] or found["robustness"]):
        return []
    md = ["## Analyses of the mixers", "",
          "Invariance (top-1 and consistency with the untransformed prediction per level), effective "
          "receptive field (area of the smallest centred square holding 20/30/50/99% of the input-gradient "
          "mass, as a fraction of the image) and white-box robustness (top-1 under FGSM / PGD-l_inf), as "
          "`stm-analyze` measured them; the data and model of each are in report.json.", ""]
    for kind, results in sorted(found["invariance"].items()):
        md += [f"### Invariance: {kind}", "", "| model | images | standard top-1 | top-1 at the last level | "
               "mean consistency | consistency at the last level |", "|---|---|---|---|---|---|"]
        for r in results:
            lv = r["levels"]
            mean = sum(x["consistency"] for x in lv) / len(lv)
            md.append(f"| {r['name']} | {r['num_images']} | {r['standard']['acc1']:.2f} | {lv[-1]['acc1']:.2f} "
                      f"(level {lv[-1]['level']}) | {mean:.2f} | {lv[-1]['consistency']:.2f} |")
        md.append("")
    if found["erf"]:
        md += ["### Effective receptive field", "", "| model | images | 20% | 30% | 50% | 99% |",
               "|---|---|---|---|---|---|"]
        md += [f"| {r['name']} | {r['num_images']} | " + " | ".join(f"{r['area_ratio'][t]:.4f}" for t in
                                                                    ("0.2", "0.3", "0.5", "0.99")) + " |"
               for r in found["erf"]]
        md.append("")
    if found["robustness"]:
        eps = sorted({a["eps"] for r in found["robustness"] for a in r["attacks"]})
        md += ["### Adversarial robustness (top-1 %)", "",
               "| model | images | clean | " + " | ".join(f"{k} {e * 255:g}/255" for k in ("FGSM", "PGD")
                                                          for e in eps) + " |",
               "|---|---|---|" + "---|" * (2 * len(eps))]
        for r in found["robustness"]:
            by = {(a["attack"], a["eps"]): a["acc1"] for a in r["attacks"]}
            cells = [by.get((k, e)) for k in ("fgsm", "pgd") for e in eps]
            md.append(f"| {r['name']} | {r['num_images']} | {r['clean_acc1']:.2f} | "
                      + " | ".join("–" if c is None else f"{c:.2f}" for c in cells) + " |")
        md.append("")
    md += [f"![{os.path.splitext(os.path.basename(p))[0]}]({os.path.basename(p)})" for p in pngs] + [""]
    return md
