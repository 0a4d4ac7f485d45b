"""The results of `stm-bench gpu_train`: ratios against the targets, the markdown table, and the
files, written atomically so that a run killed between two writes keeps the previous whole file.

Standard library only: tools/gpu_check_report.py reads these files without importing torch.
"""
import json
import os

ENGINE_MIN_RATIO, COMPILE_MIN_RATIO = 0.95, 1.2  # issue 10, "Must show"


def ratios(rows) -> list:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        ips = {r["mode"]: r["img_per_s"] for r in rows if r["model"] == model and r["img_per_s"]}
        e_p = round(ips["engine"] / ips["plain"], 3) if "engine" in ips and "plain" in ips else None
        c_e = round(ips["engine_compile"] / ips["engine"], 3) if "engine_compile" in ips and "engine" in ips else None
        out.append({"model": model, "engine_vs_plain": e_p, "engine_ok": None if e_p is None else e_p >= ENGINE_MIN_RATIO,
                    "compile_vs_eager": c_e, "compile_ok": None if c_e is None else c_e >= COMPILE_MIN_RATIO})
    return out


def cell(v):
    return "—" if v is None else str(v)


def _note(r) -> str:
    if r.get("error") or r.get("skipped"):
        return r.get("error") or r.get("skipped")
    if r.get("state") == "measuring":
        # Only seen in a file written while the case ran: the run was killed if it still says so.
        return "still being measured when this was written"
    return ""


def markdown(meta, rows) -> str:
    ds = f", DeepSpeed config {meta['ds_config']}" if meta.get("ds_config") else ""
    lines = [f"Device: {meta['device_name']}; torch {meta['torch']}, CUDA {meta['cuda']}, DeepSpeed "
             f"{meta['deepspeed']}; stm_dist._C CUDA kernel: {meta['c_cuda_kernel']}; {meta['precision']}, "
             f"batch {meta['batch']}, {meta['img_size']}², ZeRO {meta['zero_stage']}{ds}, channels_last "
             f"{meta['channels_last']}; {meta['rounds']} rounds x {meta['steps']} steps after {meta['warmup']} warm-up.",
             "", "| model | mode | ZeRO | img/s | per round | step ms | peak MiB | first step s | loss | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loss = None if r["loss"] is None else f"{r['loss']:.4f}"
        first = None if r["first_step_s"] is None else round(r["first_step_s"], 2)
        lines.append(f"| {r['model']} | {r['mode']} | {cell(r.get('zero_stage'))} | {cell(r['img_per_s'])} | "
                     f"{' / '.join(map(str, r['img_per_s_rounds'])) or '—'} | {cell(r['step_ms'])} | "
                     f"{cell(r['peak_mib'])} | {cell(first)} | {cell(loss)} | {_note(r).replace('|', '/')} |")
    lines += ["", f"| model | engine / plain (need ≥ {ENGINE_MIN_RATIO}) | compile / eager (need ≥ {COMPILE_MIN_RATIO} "
              "for ConvNeXt, Swin) |", "|---|---|---|"]
    ok = {True: " ok", False: " BELOW", None: ""}
    for q in ratios(rows):
        lines.append(f"| {q['model']} | {cell(q['engine_vs_plain'])}{ok[q['engine_ok']]} | "
                     f"{cell(q['compile_vs_eager'])}{ok[q['compile_ok']]} |")
    return "\n".join(lines) + "\n"


def _replace(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # a kill mid-write never leaves half a file


def write(json_path, md_path, meta, rows):
    doc = {"meta": meta, "rows": rows, "ratios": ratios(rows)}
    if json_path:
        _replace(json_path, json.dumps(doc, indent=1))
    if md_path:
        _replace(md_path, markdown(meta, rows))


# What a later run may add to a file only when it measured the same way (--append).
SAME = ("device_name", "batch", "img_size", "precision", "channels_last", "num_classes")


def load_for_append(path, meta) -> list:
    """The rows already in `path`, checked to be comparable with this run's settings."""
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            doc = json.load(f)
        rows, old = doc["rows"], doc["meta"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"stm-bench gpu_train: --append: {path} is not a gpu_train result file ({e}); "
                         "move it away or drop --append") from None
    differs = [k for k in SAME if old.get(k) != meta.get(k)]
    if differs:
        raise SystemExit(f"stm-bench gpu_train: --append: {path} was measured with other settings ("
                         + ", ".join(f"{k} {old.get(k)!r} there, {meta.get(k)!r} now" for k in differs) + ")")
    return rows
