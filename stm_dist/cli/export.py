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

Detection runs (model.task=detection) and detector files export the whole Mask R-CNN (fp32, our
key layout; model name and the detector's description: head, classes, test scale), which
stm-eval evaluates and model.pretrained takes the backbone from; --mmdet writes the mmdet 2.x
layout of the paper's released detectors instead:
    stm-export runs/mask_rcnn_swin_t -o mask_rcnn_swin_t.pth
    stm-export runs/mask_rcnn_swin_t --mmdet -o mask_rcnn_unified_swin_tiny_1x.pth
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
    p.add_argument("--mmdet", action="store_true",
                   help="detection: write the mmdet 2.x layout of the paper's released detectors (.pth)")
    return p


def _export_detector(args, warn) -> int:
    from stm_dist.engine.detection_weights import export_detector

    if args.onnx:
        print("stm-export: --onnx exports classification models; this is a detector", file=sys.stderr)
        return 1
    if not args.output:
        print("stm-export: give -o OUT.pth (or .safetensors) for the detector's weights", file=sys.stderr)
        return 1
    info = export_detector(args.run, args.output, ema=args.ema, mmdet=args.mmdet, fmt=args.format, warn=warn,
                           model=args.model)
    d = info["detector"]
    print(f"wrote {args.output} ({info['format']}, {info['layout']} layout; {'EMA' if args.ema else 'trained'} "
          f"Mask R-CNN weights ({d['head']} head, {d['num_classes']} classes) on {info['model']}, "
          f"step {info['step']}, from {info['source']})", flush=True)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.output and not args.onnx:
        parser.error("nothing to write: give -o WEIGHTS (.pth / .safetensors) and/or --onnx OUT.onnx")
    from stm_dist.engine.export import format_for, load_source, write

    def warn(msg):
        print(f"stm-export: {msg}", file=sys.stderr)

    try:
        from stm_dist.engine.detection_weights import guess_task

        if args.mmdet or guess_task(args.run, warn=lambda m: None) == "detection":
            return _export_detector(args, warn)
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
