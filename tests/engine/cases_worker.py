"""Run under the real `deepspeed` launcher by engine_launch.run_cases: several stm-train runs in
one launch, one after another in the same process group, each exactly as `stm-train --config
CONFIG OVERRIDES...` would run it (config loading and its checks, then the trainer).

A launch costs ~20-35 s of start-up (imports, the process group, DeepSpeed's ops) and a small
run a few seconds, so tests that need many runs at the same world size pay the start-up once.
--cases is a JSON list of {"name", "config", "overrides"}; rank 0 appends to --result a
{"started": name} line before each case and {"case": name, "exit": code} or {"case": name,
"error": ..., "traceback": ...} after it: a case that fails is reported and the next one runs,
and a launch that hangs or dies still says which case it was in.
"""
import argparse
import gc
import json
import sys
import traceback


def run_case(case) -> int:
    from stm_dist.engine import ds_setup
    from stm_dist.engine.config import check_model_name, load
    from stm_dist.engine.trainer import Trainer

    cfg = load(case["config"], case.get("overrides", []))
    check_model_name(cfg)  # as stm-train does: loads model.mixer_module
    ds_setup.check(cfg)
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        trainer.feed.close()
        del trainer
        gc.collect()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cases", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_args()

    from stm_dist.engine.distributed import finish, init

    rank, _, _ = init()
    with open(args.cases) as f:
        cases = json.load(f)

    def report(rec):
        if rank == 0:
            with open(args.result, "a") as f:
                f.write(json.dumps(rec) + "\n")

    for case in cases:
        report({"started": case["name"]})
        rec = {"case": case["name"]}
        try:
            rec["exit"] = run_case(case)
        except Exception as e:  # noqa: BLE001 - reported; the next case runs
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["traceback"] = traceback.format_exc()[-3000:]
            print(f"[cases] {case['name']} failed:\n{rec['traceback']}", file=sys.stderr, flush=True)
        # What the rank's start-up imported (test_matrix checks DeepSpeed's Muon stays out).
        rec["inductor_compile_fx_loaded"] = "torch._inductor.compile_fx" in sys.modules
        report(rec)
    finish(0)


if __name__ == "__main__":
    main()
