"""stm-export: consolidate a run's newest complete checkpoint (any ZeRO stage) into one fp32
weights file in the original key layout, with the model name and its pretrained_cfg inside;
and/or an ONNX graph of the model, checked with onnxruntime against the eager model.

    stm-export runs/swin_t -o swin_t.pth               # the trained weights (torch container)
    stm-export runs/swin_t --ema -o swin_t.safetensors # the EMA weights, as safetensors
    stm-export runs/swin_t -o w.bin --format pth       # the format is the suffix's unless given
    stm-export swin_t.safetensors --onnx swin_t.onnx   # a weights file (or a run) -> ONNX

Either weights file loads with create_model + load_pretrained, and through timm (which takes
the input size, crop and class count from the file):
    timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))
The ONNX graph takes (N, 3, H, W) images at the weights' input size, N dynamic, and returns the
logits; it is written only when onnxruntime agrees with the eager model (max |diff| <= 1e-4 at
two batch sizes), unless --no-check. Files get the mode the umask gives new files.
"""
import argparse
import sys


def build_parser():
    p = argparse.ArgumentParser(prog="stm-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_OR_FILE",
                   help="run directory, its checkpoints/ folder, one step* checkpoint folder, or a weights file "
                        "(an export, best.pth, an original release file)")
    p.add_argument("-o", "--output", default=None, help="weights file to write: NAME.pth or NAME.safetensors")
    p.add_argument("--format", choices=["pth", "safetensors"], default=None,
                   help="file format (default: from the output's suffix; .safetensors, else pth)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights instead of the trained ones")
    p.add_argument("--onnx", default=None, metavar="OUT.onnx", help="also (or only) write the model as an ONNX graph")
    p.add_argument("--no-check", action="store_true",
                   help="write the ONNX graph without comparing onnxruntime's logits with the eager model's")
    p.add_argument("--model", default=None,
                   help="registered model name, for a weights file that does not name its model (a bare state dict)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.output and not args.onnx:
        parser.error("nothing to write: give -o WEIGHTS (.pth / .safetensors) and/or --onnx OUT.onnx")
    from stm_dist.engine.export import format_for, load_source, write

    def warn(msg):
        print(f"stm-export: {msg}", file=sys.stderr)

    try:
        fmt = format_for(args.output, args.format) if args.output else None
        sd, info = load_source(args.run, ema=args.ema, warn=warn, model=args.model)
        what = f"{'EMA' if args.ema else 'trained'} weights of {info['model']}, step {info['step']}, from {info['source']}"
        if args.output:
            write(sd, args.output, info, fmt)
            print(f"wrote {args.output} ({fmt}; {what})", flush=True)
        if args.onnx:
            from stm_dist.engine.onnx_export import OnnxMismatch, export_onnx

            try:
                r = export_onnx(sd, info, args.onnx, check=not args.no_check)
            except OnnxMismatch as e:
                print(f"stm-export: {e}", file=sys.stderr)
                return 1
            s = r["img_size"]
            checked = ("not checked (--no-check)" if r["max_abs_diff"] is None else
                       f"onnxruntime vs eager: max |diff| {r['max_abs_diff']:.2e} over the logits at batch 1 and 3 "
                       "(tolerance 1e-4)")
            print(f"wrote {args.onnx} (ONNX opset {r['opset']}, images (N, 3, {s}, {s}) -> logits, N dynamic; {what}); "
                  f"{checked}", flush=True)
    except (FileNotFoundError, KeyError, RuntimeError, ValueError) as e:
        print(f"stm-export: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
