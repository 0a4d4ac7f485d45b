"""Weights -> an ONNX graph through torch's dynamo exporter, checked with onnxruntime.

The graph takes (N, 3, H, W) images at the weights' recorded input size (their pretrained_cfg:
a DCNv3 stage's sampling grid and a PVT position embedding are fixed by it) with a dynamic batch
N, and returns the logits. DCNv3's compiled op is translated by stm_dist.ops.onnx_export (the
reference decomposition in standard ONNX ops). Before the file is put in place, onnxruntime runs
it on random images at two batch sizes and its logits are compared with the eager model's: a
graph that disagrees by more than `tol` is not written.
"""
from __future__ import annotations

import os

import torch

__all__ = ["export_onnx", "check_onnx", "OnnxMismatch"]

CHECK_BATCHES = (1, 3)  # neither is the traced batch (2): the dynamic batch dim is exercised


class OnnxMismatch(RuntimeError):
    """onnxruntime's output differs from the eager model's beyond the tolerance."""


def _model(sd: dict, info: dict):
    from stm_dist.models import create_model, load_pretrained

    cfg = info.get("pretrained_cfg") or {}
    size = int((cfg.get("input_size") or (3, 224, 224))[-1])
    classes = int(sd["head.weight"].shape[0]) if "head.weight" in sd else int(cfg.get("num_classes", 1000))
    model = create_model(info["model"], num_classes=classes, img_size=size)
    load_pretrained(model, sd)  # strict: every key matched
    return model.float().eval(), size


def check_onnx(path: str, model, size: int, batches=CHECK_BATCHES, seed: int = 0) -> float:
    """Max |onnxruntime - eager| over the logits of random images at each batch size."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for b in batches:
        x = torch.randn(b, 3, size, size, generator=gen)
        with torch.no_grad():
            ref = model(x)
        got = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        if got.shape != ref.shape:
            raise OnnxMismatch(f"{path}: onnxruntime returned shape {tuple(got.shape)} for a batch of {b}, "
                               f"eager {tuple(ref.shape)}")
        worst = max(worst, (got - ref).abs().max().item())
    return worst


def export_onnx(sd: dict, info: dict, out_path: str, check: bool = True, tol: float = 1e-4) -> dict:
    """Write the ONNX graph of the model `info` names holding `sd`; returns {'path', 'img_size',
    'opset', 'max_abs_diff' (None without the check)}. The file appears only when complete (and
    checked), with the umask's mode."""
    from stm_dist.ops.onnx_export import OPSET, translation_table

    from .export import publish

    model, size = _model(sd, info)
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(model, (example,), dynamo=True, opset_version=OPSET, verbose=False,
                                dynamic_shapes=({0: batch},), custom_translation_table=translation_table(),
                                input_names=["images"], output_names=["logits"])
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.tmp-{os.getpid()}.onnx"
    try:
        program.save(tmp)
        diff = None
        if check:
            diff = check_onnx(tmp, model, size)
            if not diff <= tol:
                raise OnnxMismatch(f"{out_path}: onnxruntime's logits differ from the eager model's by up to "
                                   f"{diff:.3g} (tolerance {tol:g}); not written (--no-check writes it anyway)")
        publish(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"path": out_path, "img_size": size, "opset": OPSET, "max_abs_diff": diff}
