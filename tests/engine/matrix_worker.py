"""Run under the real `deepspeed` launcher by test_matrix.py: every mixer x the ZeRO stages and
precisions named, through the trainer users run (stm_dist.engine.trainer.Trainer, the shipped
ds_configs), one launch for many cases.

Each case trains STEPS steps of the digits recipe in its own run directory. With --resume-stage
S, the fp32 case of stage S also trains a second run that stops at step RESUME_AT (checkpoint)
and is restarted in the same run directory by a new Trainer: its later steps must repeat the
uninterrupted case's losses bit for bit. Rank 0 appends one JSON line per case to --result as
soon as the case ends ({"case": ..., "losses": [...], "resumed": [...]} or {"case": ..., "error":
...}), and a {"started": case} line before it begins, so a launch that hangs or dies still says
which case it was in.
"""
import argparse
import gc
import json
import os
import sys
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIXERS = ("halo", "pvt", "swin", "convnext", "dcn_v3", "pool")
STEPS, RESUME_AT = 3, 2
BASE = ["model.num_classes=10", "model.img_size=32", "data.num_threads=1", "data.randaug=false",
        "train.global_batch=16", "train.micro_batch=8", "train.log_every=1",
        "train.ema_decay=0.9", "train.eval_every_epochs=0", "schedule.epochs=2", "schedule.warmup_epochs=1", "optim.lr=2e-3",
        "checkpoint.every_steps=0", "checkpoint.keep_last=1"]


def overrides(mixer, stage, precision, shards, run_dir, steps):
    o = [f"model.name=unified_{mixer}_micro", f"deepspeed.config={REPO}/ds_configs/zero{stage}_{precision}.json",
         f"data.train_shards={shards}", f"run.out_dir={run_dir}", f"schedule.max_steps={steps}", *BASE]
    if mixer == "pool":
        o.append(f"model.mixer_module={REPO}/examples/pool_mixer.py")
    return o


def train(args, mixer, stage, precision, run_dir, steps):
    from stm_dist.engine.config import check_model_name, load
    from stm_dist.engine.trainer import Trainer

    cfg = load(os.path.join(REPO, "configs", "demo_digits.yaml"),
               overrides(mixer, stage, precision, args.shards, run_dir, steps) + args.extra)
    check_model_name(cfg)  # as stm-train does: loads model.mixer_module
    trainer = Trainer(cfg)
    code = trainer.train()
    trainer.feed.close()
    del trainer
    gc.collect()
    if code != 0:
        raise RuntimeError(f"Trainer.train() returned {code}")
    losses = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == "train":
                losses[r["step"]] = r["loss"]  # a restart's records come later: the last one wins
    return [losses[s] for s in sorted(losses)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shards", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--mixers", default=",".join(MIXERS))
    p.add_argument("--resume-stage", type=int, default=None)
    p.add_argument("--extra", nargs="*", default=[], help="more section.key=value overrides for every case")
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_args()

    from stm_dist.engine.distributed import finish, init

    rank, _, _ = init()

    def report(rec):
        if rank == 0:
            with open(args.result, "a") as f:
                f.write(json.dumps(rec) + "\n")

    for precision in args.precisions.split(","):
        for stage in map(int, args.stages.split(",")):
            for mixer in args.mixers.split(","):
                case = f"{mixer}/zero{stage}/{precision}"
                report({"started": case})
                rec = {"case": case, "mixer": mixer, "stage": stage, "precision": precision}
                try:
                    base = os.path.join(args.out_dir, case.replace("/", "_"))
                    rec["losses"] = train(args, mixer, stage, precision, base, STEPS)
                    if stage == args.resume_stage and precision == "fp32":
                        again = base + "_resume"
                        first = train(args, mixer, stage, precision, again, RESUME_AT)
                        rec["resumed"] = train(args, mixer, stage, precision, again, STEPS)
                        rec["resumed_first"] = first
                except Exception as e:  # noqa: BLE001 - the case is reported, the matrix goes on
                    rec["error"] = f"{type(e).__name__}: {e}"
                    rec["traceback"] = traceback.format_exc()[-3000:]
                    print(f"[matrix] {case} failed:\n{rec['traceback']}", file=sys.stderr, flush=True)
                report(rec)
    finish(0)


if __name__ == "__main__":
    main()
