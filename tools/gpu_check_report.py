"""The report of tools/gpu_check.sh: $OUT/gpu_check.md and gpu_check.json from the script's phase
events, its combined log and the benchmark's files.

The script calls this at every phase start and end, and once more at the end with --final, so a
run killed at any moment (the device tool's time limit) leaves a report in $OUT that names the
phases done, the one that was running, and those not reached. Standard library only, no torch:
each call costs ~50 ms. Files are replaced atomically. With --final the exit status is 0 when
every phase that ran passed, else 1.
"""
import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "stm_dist", "bench"))
from _gpu_train_table import markdown  # noqa: E402  (the module, not the package: no torch import)

WHAT = {
    "env": "the card, its arch (-> TORCH_CUDA_ARCH_LIST), torch/CUDA, nvcc",
    "build_C": "stm_dist._C built for that arch (setup.py build_ext --inplace)",
    "bundle": "DeepSpeed installed offline from gpu_bundle/, FusedAdam JIT-built",
    "tests_ops": "the CPU tests of tests/ops, beside tests_gpu; stopped when the benchmark starts",
    "tests_gpu": "CUDA op tests: fp32/fp16/bf16 vs the CPU kernel, under autocast vs the reference; cubins; argument checks",
    "bench": "eager pairs (plain AMP loop vs engine), DCNv3 first -> gpu_train.json / .md",
    "zero3": "one bf16 step of unified_dcn_v3_tiny under ZeRO 3, ds_configs/zero3_bf16.json -> zero3.json",
    "bench_compile": "engine_compile cases with the time left -> gpu_train.json / .md",
    "compile_zero3": "tests/engine/test_compile_zero3.py (cold DeepSpeed + two inductor compiles)",
}
# pytest's last line, with -q bare ("2 passed, 1 skipped in 1.75s"), else between "=" rules.
PYTEST_SUMMARY = re.compile(r"^=*\s*(.*\b(?:passed|failed|skipped|errors?|deselected|collected|no tests ran)\b.* in "
                            r"[\d.]+s\b.*?)\s*=*$")
PYTEST_PROGRESS = re.compile(r"^[.sxXFE]+\s+\[\s*\d+%\]$")
SUMMARY = {"env": re.compile(r"^(card|CUDA_HOME|TORCH_CUDA_ARCH_LIST): .*$"),
           "build_C": re.compile(r"^(_C build|_C loaded).*$"),
           "bundle": re.compile(r"^(deepspeed install|FusedAdam JIT|no gpu_bundle|gpu_bundle/ missing).*$")}
NOTES = ["DALI's `mixed` (GPU) decode is not tested here: the GPU image has no DALI and no wheel for it "
         "can be installed there (no package index), so tests/data's GPU loader test is left out."]


def _read_events(path):
    phases = {}
    for line in open(path):
        name, event, at, rc, secs, soft, note = (line.rstrip("\n").split("\t") + [""] * 7)[:7]
        p = phases.setdefault(name, {"phase": name})
        p.update({"soft": soft == "1"})
        if event == "start":
            p.update(started_at=int(at))
        else:
            p.update(event=event, ended_at=int(at), exit=int(rc), seconds=int(secs), note=note)
    return phases


def _log_lines(out):
    lines = {}
    try:
        with open(os.path.join(out, "gpu_check.log"), errors="replace") as f:
            for line in f:
                m = re.match(r"^\[(\w+)\] (.*)$", line.rstrip("\n"))
                if m:
                    lines.setdefault(m.group(1), []).append(m.group(2))
    except OSError:
        pass
    return lines


def _load(out, name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _tests_failed(lines):
    """Failures pytest reported (its summary, or the progress line of a run cut short)."""
    summary = [m.group(1) for m in map(PYTEST_SUMMARY.match, lines) if m]
    if summary:
        return bool(re.search(r"\d+ (failed|errors?)\b", summary[-1])), summary[-1]
    progress = "".join(x for x in lines if PYTEST_PROGRESS.match(x))
    return ("F" in progress or "E" in progress), f"{progress.count('.')} passed before it stopped" if progress else ""


def _status(p, lines, bench, zero3):
    """(status text, failed?, summary) of one phase."""
    if "started_at" not in p and "event" not in p:
        return "not reached", False, ""
    if "event" not in p:
        return f"running since +{p['started_at']} s when this was written", False, ""
    if p["event"] == "unselected":
        return "not selected", False, p["note"]
    if p["event"] == "skip":
        return f"skipped: {p['note']}", False, ""
    rc, soft = p["exit"], p["soft"]
    name = p["phase"]
    summary, failed = "", False
    if name.startswith("tests") or name == "compile_zero3":
        failed, summary = _tests_failed(lines)
    elif name in ("bench", "bench_compile", "zero3"):
        doc = zero3 if name == "zero3" else bench
        rows = [r for r in (doc or {}).get("rows", [])
                if name == "zero3" or (r["mode"] == "engine_compile") == (name == "bench_compile")]
        failed = any(r.get("error") for r in rows)
        summary = (f"{sum(1 for r in rows if r['img_per_s'])} measured, {sum(1 for r in rows if r.get('error'))} "
                   f"failed, {sum(1 for r in rows if r.get('skipped'))} skipped for time")
    else:
        pat = SUMMARY.get(name)
        summary = "; ".join(x for x in lines if pat and pat.match(x))[-400:]
    cut = p["note"] == "stopped" or rc in (124, 137)
    if cut and soft:
        why = "stopped so that the benchmark runs alone" if p["note"] == "stopped" else "its time ran out"
        return f"cut short: {why}" + ("; something in it FAILED" if failed else ""), failed, summary
    if rc in (124, 137):
        return f"TIMED OUT (limit reached after {p['seconds']} s)", True, summary
    if rc != 0:
        return f"FAILED (exit {rc})", True, summary
    return "ok", False, summary


def report(args):
    events = _read_events(args.events)
    lines = _log_lines(args.out)
    bench, zero3 = _load(args.out, "gpu_train.json"), _load(args.out, "zero3.json")
    phases, failed = [], []
    for name in args.plan.split(","):
        p = events.get(name, {"phase": name})
        status, bad, summary = _status(p, lines.get(name, []), bench, zero3)
        phases.append({"phase": name, "status": status, "failed": bad, "seconds": p.get("seconds"),
                       "started_at": p.get("started_at"), "summary": summary, "does": WHAT.get(name, "")})
        if bad:
            failed.append(name)
    elapsed = int(time.time()) - args.t0
    card = next((x[len("card: "):] for x in lines.get("env", []) if x.startswith("card: ")), "not read yet")
    state = ("final: the script ended" if args.final else
             "written while the run went on; if this is the last version that came back, the run was killed here")
    md = ["# GPU check" + (" (dry run on CPU: micro models, tiny sizes; numbers mean nothing)" if args.dry else ""), "",
          f"Card: {card}. Report at +{elapsed} s of a {args.total} s budget ({state}).",
          "Result: " + (f"FAILED: {', '.join(failed)}" if failed else "every phase that ran passed"), "",
          "| phase | status | s | summary | does |", "|---|---|---|---|---|"]
    md += [f"| {p['phase']} | {p['status']} | {'' if p['seconds'] is None else p['seconds']} | "
           f"{p['summary'].replace('|', '/')} | {p['does']} |" for p in phases]
    md += ["", "Every phase's output: gpu_check.log (lines prefixed [phase])."]
    for title, doc in (("Benchmark", bench), ("ZeRO 3 step", zero3)):
        md += ["", f"## {title}", "", markdown(doc["meta"], doc["rows"]) if doc else "Nothing measured yet."]
    md += ["", "## Not possible on this machine", ""] + [f"- {n}" for n in NOTES]
    doc = {"dry_run": args.dry, "final": args.final, "elapsed_s": elapsed, "budget_s": args.total, "card": card,
           "failed": failed, "phases": phases, "bench": bench, "zero3": zero3, "notes": NOTES}
    for name, text in (("gpu_check.json", json.dumps(doc, indent=1)), ("gpu_check.md", "\n".join(md) + "\n")):
        tmp = os.path.join(args.out, f".{name}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(args.out, name))
    return 1 if failed else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", required=True, help="the script's phase events (tab-separated)")
    p.add_argument("--out", required=True, help="the folder the device tool brings back ($OUT)")
    p.add_argument("--plan", required=True, help="every phase, in order, comma-separated")
    p.add_argument("--t0", type=int, required=True, help="the script's start (epoch seconds)")
    p.add_argument("--total", type=int, required=True, help="the script's time budget, seconds")
    p.add_argument("--dry", action="store_true")
    p.add_argument("--final", action="store_true")
    args = p.parse_args(argv)
    rc = report(args)
    return rc if args.final else 0


if __name__ == "__main__":
    sys.exit(main())
