"""stm-train: train one model with DeepSpeed.

    stm-train --config unified_swin_tiny [section.key=value ...]     # a shipped recipe, by name
    stm-train --config path/to/my_recipe.yaml [section.key=value ...]
    stm-train --config unified_swin_tiny --print-config               # the resolved config; no run
    deepspeed --num_gpus 8 -m stm_dist.cli.train --config ... run.out_dir=runs/swin_t
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_accelerators 2 -m stm_dist.cli.train ...
    torchrun --nproc_per_node 2 -m stm_dist.cli.train --config ...

Restarting with the same run.out_dir resumes from the newest complete checkpoint there, if
its recipe (model, data, augmentation, optimiser, schedule, precision, the DeepSpeed JSON) is
unchanged; world size, micro-batch, paths, threads and logging may change freely.
"""
import argparse
import sys


def build_parser():
    p = argparse.ArgumentParser(prog="stm-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True,
                   help="a recipe name (unified_swin_tiny: the configs/ shipped with stm_dist) or an experiment YAML path")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved experiment config (overrides applied, the DeepSpeed JSON's path) and exit")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=4e-3 run.out_dir=runs/x")
    p.add_argument("--resume", metavar="PATH", default=None,
                   help="start from this checkpoint (a run dir or a step* folder) when run.out_dir has none of "
                        "its own: branch an experiment (add run.allow_recipe_change=true to change its recipe)")
    p.add_argument("--fresh", action="store_true",
                   help="move run.out_dir's checkpoints aside (renamed, never deleted) and start from scratch")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment is what we use.
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from stm_dist.engine.config import ConfigError, load

    from stm_dist.engine.config import check_model_name

    extra = ([f"run.resume_from={args.resume}"] if args.resume else []) + (["run.fresh=true"] if args.fresh else [])
    try:
        cfg = load(args.config, list(args.overrides) + extra)
        check_model_name(cfg)
        from stm_dist.engine import ds_setup

        ds_setup.check(cfg)  # the DeepSpeed JSON's mistakes, before any process group starts
    except ConfigError as e:
        print(f"stm-train: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        from stm_dist.engine.config import resolve_config

        print(f"# {resolve_config(args.config)}" + (f" + {' '.join(args.overrides)}" if args.overrides else ""))
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from stm_dist.engine.distributed import finish
    from stm_dist.engine.trainer import Trainer

    try:
        code = Trainer(cfg).train()
    except ConfigError as e:
        print(f"stm-train: config error: {e}", file=sys.stderr)
        finish(2)
    except BaseException:
        import traceback

        traceback.print_exc()
        finish(1)
    finish(code)
    return code  # not reached: finish() ends the process


if __name__ == "__main__":
    raise SystemExit(main())
