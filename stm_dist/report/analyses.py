"""The analyses (stm-analyze outputs) of several models in the report: the paper's comparison of
the mixers side by side, one figure per analysis, and their numbers for report.md/report.json.

An analysis output is a JSON file stm-analyze wrote: invariance_<type>.json, erf.json (with its
erf_map.npy beside it) or robustness.json, each holding the "model" it measured and its
"provenance" (stm_dist.analysis.provenance).

Comparability: results are only put side by side when the settings that change their numbers
match (COMPARABLE: the data (manifest hash) and split, the image size, the number of images, the
crop, and for robustness the PGD steps, step size and random start). Results that differ are
*separated*, not refused: each set of settings is its own group, with its own table and figure,
headed by those settings, and stm-report prints a note naming the setting that differs and the
files on each side. Separating keeps a report over a mixed folder useful; refusing would make one
stray file block the rest. The seed (jitter directions, PGD starts), the checkpoint and the --eps
list are recorded but not compared: the robustness headline is per eps, so runs with different
eps lists do compare at a shared eps. Results written before provenance was recorded group
together as "not recorded".
"""
from __future__ import annotations

import json
import os

import numpy as np

from . import paper

FILES = ("erf.json", "robustness.json")
COMMON = ("data", "split", "img_size", "num_images", "crop_pct")
COMPARABLE = {"invariance": COMMON, "erf": COMMON + ("input",),
              "robustness": COMMON + ("pgd_steps", "pgd_step_size", "pgd_random_start")}
THRESHOLDS = ("0.2", "0.3", "0.5", "0.99")


def _title(model: str) -> str:
    ms = paper.mixer_and_size(model)
    return f"{paper.mixer_title(ms[0])} {ms[1]}" if ms else model


def settings_of(kind: str, r: dict) -> dict:
    """The settings that must match for `r` to be compared with another result of `kind`."""
    p = r.get("provenance") or {}
    attack = p.get("attack") or {}
    every = {"data": (p.get("data") or {}).get("manifest_sha256"), "split": (p.get("data") or {}).get("split"),
             "img_size": p.get("img_size", r.get("img_size")), "num_images": r.get("num_images"),
             "crop_pct": p.get("crop_pct"), "input": p.get("input"), "pgd_steps": attack.get("pgd_steps"),
             "pgd_step_size": attack.get("pgd_step_size"), "pgd_random_start": attack.get("pgd_random_start")}
    return {k: every[k] for k in COMPARABLE[kind]}


def _upgrade(kind: str, r: dict) -> dict:
    """Robustness files from before the per-eps headline: acc1 was the accumulated number and
    acc1_single the per-eps one."""
    if kind == "robustness":
        for a in r.get("attacks", []):
            if "acc1_single" in a:
                a["acc1"], a["acc1_accumulated"] = a.pop("acc1_single"), a["acc1"]
    return r


def _group(kind: str, results: list, label: str) -> tuple[list, list]:
    """Results -> ([{"settings", "results"}], notes): one group per distinct settings."""
    groups: dict = {}
    for r in results:
        key = json.dumps(settings_of(kind, r), sort_keys=True, default=str)
        groups.setdefault(key, {"settings": settings_of(kind, r), "results": []})["results"].append(r)
    out = [groups[k] for k in sorted(groups)]
    for g in out:
        g["results"].sort(key=lambda r: (paper.order_key(r["model"]), r["dir"]))
        models = [r["model"] for r in g["results"]]
        for r in g["results"]:  # the same model analysed twice (e.g. two runs): tell them apart
            r["name"] = _title(r["model"]) + (f" ({r['dir']})" if models.count(r["model"]) > 1 else "")
    notes = []
    if len(out) > 1:
        differ = [k for k in COMPARABLE[kind] if len({json.dumps(g["settings"][k], default=str) for g in out}) > 1]
        sides = []
        for k in differ:
            for g in out:
                files = [r["_file"] for r in g["results"]]
                more = f" (+{len(files) - 3} more)" if len(files) > 3 else ""
                sides.append(f"{k} {_show(k, g['settings'][k])} in {', '.join(files[:3])}{more}")
        notes.append(f"{label} results are not comparable ({'; '.join(sides)}): reported as {len(out)} separate groups")
    return out, notes


def _show(key: str, value) -> str:
    if value is None:
        return "not recorded"
    if key == "data":
        return f"manifest sha256 {str(value)[:12]}"
    return str(value)


def collect_analyses(root: str) -> dict:
    """{"invariance": {type: [group]}, "erf": [group], "robustness": [group], "notes": [str]}
    under `root`; a group is {"settings", "results"}, its results in the paper's mixer order,
    each with "name" (its figure label), "dir" and "_file" (relative to root)."""
    found: dict = {"invariance": {}, "erf": [], "robustness": [], "notes": []}
    if not os.path.isdir(root):
        return found
    raw: dict = {"invariance": {}, "erf": [], "robustness": []}
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
            r["_file"] = os.path.normpath(os.path.join(r["dir"], f))
            if f.startswith("invariance_"):
                raw["invariance"].setdefault(r.get("type", f[11:-5]), []).append(r)
            else:
                raw[f[:-5]].append(_upgrade(f[:-5], r))
    for t, results in sorted(raw["invariance"].items()):
        found["invariance"][t], notes = _group("invariance", results, f"invariance {t}")
        found["notes"] += notes
    for kind in ("erf", "robustness"):
        if raw[kind]:
            found[kind], notes = _group(kind, raw[kind], kind)
            found["notes"] += notes
    return found


def has_results(found: dict) -> bool:
    return bool(found["invariance"] or found["erf"] or found["robustness"])


def _figure_name(stem: str, i: int) -> str:
    return f"{stem}.png" if i == 0 else f"{stem}_{i + 1}.png"


def write_analysis_figures(found: dict, out_dir: str) -> list[str]:
    """One figure per group (<analysis>_compare.png, then _2, _3 ... for further groups); each
    group gets its "figure" file name."""
    from stm_dist.analysis import plots

    paths = []
    for kind, groups in sorted(found["invariance"].items()):
        for i, g in enumerate(groups):
            path = os.path.join(out_dir, _figure_name(f"invariance_{kind}_compare", i))
            paths.append(plots.invariance_figure(g["results"], path, labels=[r["name"] for r in g["results"]]))
            g["figure"] = os.path.basename(path)
    for i, g in enumerate(found["erf"]):
        shown = [(r, os.path.join(r["_abs_dir"], "erf_map.npy")) for r in g["results"]]
        shown = [(r, np.load(p)) for r, p in shown if os.path.isfile(p)]
        if shown:
            path = os.path.join(out_dir, _figure_name("erf_compare", i))
            paths.append(plots.erf_figure([m for _, m in shown], [r["name"] for r, _ in shown], path))
            g["figure"] = os.path.basename(path)
    for i, g in enumerate(found["robustness"]):
        path = os.path.join(out_dir, _figure_name("robustness_compare", i))
        paths.append(plots.robustness_figure(g["results"], path, labels=[r["name"] for r in g["results"]]))
        g["figure"] = os.path.basename(path)
    return paths


KEEP = ("model", "dir", "num_images", "img_size", "world_size", "seconds", "provenance")
NUMBERS = {"invariance": ("type", "level_name", "precision", "precision_note", "standard", "levels"),
           "erf": ("area_ratio", "replknet_area_ratio", "replknet_side", "definitions"),
           "robustness": ("clean_acc1", "attacks", "definitions")}


def _groups_json(kind: str, groups: list) -> list:
    return [{"group": i + 1, "settings": g["settings"], "figure": g.get("figure"),
             "results": [{k: r.get(k) for k in KEEP + NUMBERS[kind]} for r in g["results"]]}
            for i, g in enumerate(groups)]


def analyses_json(found: dict) -> dict:
    return {"invariance": {k: _groups_json("invariance", v) for k, v in sorted(found["invariance"].items())},
            "erf": _groups_json("erf", found["erf"]), "robustness": _groups_json("robustness", found["robustness"]),
            "notes": list(found["notes"])}


def _heading(title: str, i: int, groups: list) -> list[str]:
    """The section heading of group i and the settings it was measured with."""
    head = f"### {title}" + (f" (group {i + 1} of {len(groups)})" if len(groups) > 1 else "")
    s = groups[i]["settings"]
    data = (groups[i]["results"][0].get("provenance") or {}).get("data")
    where = f"{data['shards']} ({data['split']}, {_show('data', s['data'])})" if data else "not recorded"
    shown = [f"{k} {_show(k, v)}" for k, v in s.items() if k not in ("data", "split") and v is not None]
    return [head, "", f"Settings: data {where}, " + ", ".join(shown) + ".", ""]


def _figure(g: dict) -> list[str]:
    return [f"![{g['figure'][:-4]}]({g['figure']})", ""] if g.get("figure") else []


def _invariance_md(kind: str, groups: list) -> list[str]:
    md = []
    from stm_dist.analysis.plots import level_label

    for i, g in enumerate(groups):
        first = g["results"][0]
        md += _heading(f"Invariance: {kind}", i, groups)
        md += [f"Levels: {level_label(first)}. Evaluated in {first.get('precision', 'fp32')}; the original's "
               "evaluation ran with AMP (fp16 autocast), so predictions near a tie may differ.", "",
               "| model | images | standard top-1 | top-1 at the last level | mean consistency | "
               "consistency at the last level |", "|---|---|---|---|---|---|"]
        for r in g["results"]:
            lv = r["levels"]
            mean = sum(x["consistency"] for x in lv) / len(lv)
            shift = lv[-1].get("content_shift_px")
            where = f"level {lv[-1]['level']}" + ("" if shift is None else f", content shift {shift} px")
            md.append(f"| {r['name']} | {r['num_images']} | {r['standard']['acc1']:.2f} | {lv[-1]['acc1']:.2f} "
                      f"({where}) | {mean:.2f} | {lv[-1]['consistency']:.2f} |")
        md += ["", *_figure(g)]
    return md


ERF_EXPLAINED = (
    "Two statistics, as a fraction of the image area, at t = 20/30/50/99%. Ours: the |gradient| of the central "
    "output pixel summed over images; the smallest square centred on its centre of mass holding >= t of the raw "
    "total. RepLKNet's (its analyze_erf.py): relu(gradient) averaged over images, log10(x + 1) and divided by its "
    "max; the first square of side 3, 5, ... centred on the image holding > t (n/a: none short of the whole "
    "image). Only RepLKNet's, at 1024 px, compares with its published table.")


def _erf_md(groups: list) -> list[str]:
    md = []
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    for i, g in enumerate(groups):
        md += _heading("Effective receptive field", i, groups)
        md += [] if i else [ERF_EXPLAINED, ""]  # once, above the first group
        md += ["| model | images | ours 20% | 30% | 50% | 99% | RepLKNet 20% | 30% | 50% | 99% |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        for r in g["results"]:
            theirs = r.get("replknet_area_ratio") or {}
            md.append(f"| {r['name']} | {r['num_images']} | " + " | ".join(fmt(r["area_ratio"][t]) for t in THRESHOLDS)
                      + " | " + " | ".join(fmt(theirs.get(t)) for t in THRESHOLDS) + " |")
        md += ["", *_figure(g)]
    return md


def _robustness_table(results: list, key: str) -> list[str]:
    eps = sorted({a["eps"] for r in results for a in r["attacks"]})
    md = ["| model | images | clean | " + " | ".join(f"{k} {e * 255:g}/255" for k in ("FGSM", "PGD") for e in eps)
          + " |", "|---|---|---|" + "---|" * (2 * len(eps))]
    for r in results:
        by = {(a["attack"], a["eps"]): a.get(key) for a in r["attacks"]}
        cells = [by.get((k, e)) for k in ("fgsm", "pgd") for e in eps]
        md.append(f"| {r['name']} | {r['num_images']} | {r['clean_acc1']:.2f} | "
                  + " | ".join("–" if c is None else f"{c:.2f}" for c in cells) + " |")
    return md


def _robustness_md(groups: list) -> list[str]:
    md = []
    for i, g in enumerate(groups):
        md += _heading("Adversarial robustness (top-1 %)", i, groups)
        md += ["Top-1 under each attack at each budget alone (the headline; comparable at a shared eps whatever "
               "else was run):", "", *_robustness_table(g["results"], "acc1"), "",
               "The accumulated number (acc1_accumulated): an image counts only when correct on the clean image "
               "and on every attack with budget <= eps in its run's --eps list (monotone, but it depends on that "
               "list; a dash: eps not run):",
               "", *_robustness_table(g["results"], "acc1_accumulated"), "", *_figure(g)]
    return md


def analyses_markdown(found: dict, pngs: list[str] | None = None) -> list[str]:
    if not has_results(found):
        return []
    md = ["## Analyses of the mixers", "",
          "Invariance (top-1 and consistency with the untransformed prediction per level), effective "
          "receptive field (ours and RepLKNet's area ratios) and white-box robustness (top-1 under FGSM / "
          "PGD-l_inf), as `stm-analyze` measured them. Results are side by side only when measured on the same "
          "data with the same image size, image count, crop and attack settings; otherwise they form separate "
          "groups. Each result's provenance (data, checkpoint and weights hashes, seed, settings) is in "
          "report.json.", ""]
    for note in found["notes"]:
        md += [f"Note: {note}.", ""]
    for kind, groups in sorted(found["invariance"].items()):
        md += _invariance_md(kind, groups)
    md += _erf_md(found["erf"]) + _robustness_md(found["robustness"])
    return md
