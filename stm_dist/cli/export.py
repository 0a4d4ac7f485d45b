"""stm-export: consolidate a run's newest complete checkpoint (any ZeRO stage) into one plain fp32
state dict in the original key layout, loadable by create_model + load_pretrained.

    stm-export runs/swin_t -o swin_t.pth            # the trained weights
    stm-export runs/swin_t --ema -o swin_t_ema.pth  # the EMA weights
"""
import argparse
import sys


def build_parser():
    p = argparse.ArgumentParser(prog="stm-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory, its checkpoints/ folder, or one step* checkpoint folder")
    p.add_argument("-o", "--output", required=True, help="output .pth file")
    p.add_argument("--ema", action="store_true", help="export the EMA weights instead of the trained ones")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from stm_dist.engine.export import export

    def warn(msg):
        print(f"stm-export: {msg}", file=sys.stderr)

    try:
        info = export(args.run, args.output, ema=args.ema, warn=warn)
    except (FileNotFoundError, KeyError, RuntimeError) as e:
        print(f"stm-export: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} ({'EMA' if args.ema else 'trained'} weights of {info['model']}, "
          f"step {info['step']}, from {info['source']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
