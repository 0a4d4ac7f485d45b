"""stm-export: consolidate a run's newest complete checkpoint (any ZeRO stage) into one fp32
weights file in the original key layout, with the model name and its pretrained_cfg inside.

    stm-export runs/swin_t -o swin_t.pth               # the trained weights (torch container)
    stm-export runs/swin_t --ema -o swin_t.safetensors # the EMA weights, as safetensors
    stm-export runs/swin_t -o w.bin --format pth       # the format is the suffix's unless given

Either file loads with create_model + load_pretrained, and through timm:
    timm.create_model(NAME, pretrained=True, num_classes=N, pretrained_cfg_overlay=dict(file=PATH, num_classes=N))
"""
import argparse
import sys


def build_parser():
    p = argparse.ArgumentParser(prog="stm-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory, its checkpoints/ folder, or one step* checkpoint folder")
    p.add_argument("-o", "--output", required=True, help="output file: NAME.pth or NAME.safetensors")
    p.add_argument("--format", choices=["pth", "safetensors"], default=None,
                   help="file format (default: from the output's suffix; .safetensors, else pth)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights instead of the trained ones")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from stm_dist.engine.export import export

    def warn(msg):
        print(f"stm-export: {msg}", file=sys.stderr)

    try:
        info = export(args.run, args.output, ema=args.ema, warn=warn, fmt=args.format)
    except (FileNotFoundError, KeyError, RuntimeError, ValueError) as e:
        print(f"stm-export: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} ({info['format']}; {'EMA' if args.ema else 'trained'} weights of {info['model']}, "
          f"step {info['step']}, from {info['source']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
