"""ONNX: every micro mixer's graph from the dynamo exporter (DCNv3's compiled op through its
translation) runs in onnxruntime and gives the eager logits (max |diff| <= 1e-4); stm-export
writes it from a weights file, checked, and every file it writes has the umask's mode."""
import os
import stat
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from engine_launch import REPO, env
from side_by_side import finish, start
from stm_dist.engine.export import pretrained_cfg, write
from stm_dist.models import create_model

SIZE = 64


def _weights(name: str) -> tuple:
    """A micro model whose mixers matter: layer scale 1 (not 1e-6, which makes every block nearly
    the identity), DCNv3 offsets of a few pixels (bilinear sampling between and outside pixels)
    and logits of order 1."""
    torch.manual_seed(0)
    model = create_model(name, img_size=SIZE, num_classes=10, layer_scale_init_value=1.0).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("sampling_offsets.weight"):
                p.mul_(20)
            elif key == "head.weight":
                p.mul_(50)  # logits of order 1: the 1e-4 tolerance is then a tight one
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    info = {"model": name, "pretrained_cfg": pretrained_cfg(name, sd, {"model": {"img_size": SIZE}}),
            "source": "test", "step": 0, "ema": False}
    return model, sd, info


def _ort_logits(path: str, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("mixer", ["halo", "pvt", "swin", "dcn_v3"])
def test_micro_mixer_graph_in_onnxruntime_matches_eager(mixer, tmp_path):
    from stm_dist.engine.onnx_export import export_onnx

    name = f"unified_{mixer}_micro"
    model, sd, info = _weights(name)
    path = str(tmp_path / f"{mixer}.onnx")
    r = export_onnx(sd, info, path)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(x)
    got = _ort_logits(path, x)
    diff = (got - ref).abs().max().item()
    assert got.shape == (2, 10) and diff <= 1e-4 and r["max_abs_diff"] <= 1e-4, (diff, r)
    assert ref.std() > 0.5
    ops = {(n.domain, n.op_type) for n in onnx.load(path, load_external_data=False).graph.node}
    assert all(domain in ("", "ai.onnx") for domain, _ in ops), ops  # standard ops only
    if mixer == "dcn_v3":
        assert ("", "GridSample") in ops  # the translation of the compiled op, not a fallback


def test_stm_export_writes_a_checked_onnx_graph_with_the_umask(tmp_path):
    name = "unified_convnext_micro"
    model, sd, info = _weights(name)
    src = str(tmp_path / "w.safetensors")
    write(sd, src, info, "safetensors")
    out, copy = str(tmp_path / "out" / "model.onnx"), str(tmp_path / "out" / "copy.safetensors")
    p = finish(start([sys.executable, "-m", "stm_dist.cli.export", src, "--onnx", out, "-o", copy],
                     env=env(single_process=True), cwd=REPO, preexec_fn=lambda: os.umask(0o027)))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    said = p.stdout
    assert f"wrote {out} (ONNX opset 20, images (N, 3, {SIZE}, {SIZE}) -> logits, N dynamic" in said, said
    reported = float(said.split("max |diff| ")[1].split()[0])
    assert reported <= 1e-4 and "batch 1 and 3" in said, said
    for path in (out, copy, copy + ".json"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640, (path, oct(os.stat(path).st_mode))
    assert not [f for f in os.listdir(tmp_path / "out") if ".tmp-" in f]
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model(x)
    assert np.abs((_ort_logits(out, x) - ref).numpy()).max() <= 1e-4


def test_the_op_translation_handles_several_levels(tmp_path):
    """The translation on its own, with 2 levels of different sizes and 3 points (DCNv3 uses one
    level), against the pure-PyTorch reference."""
    from stm_dist.ops import extension_available, ms_deform_attn, ms_deform_attn_reference
    from stm_dist.ops.onnx_export import translation_table

    if not extension_available():
        pytest.skip("stm_dist._C is not built: the models export the reference, no translation is used")

    class Sample(torch.nn.Module):
        def forward(self, value, loc, weights):
            shapes = torch.tensor([[5, 6], [3, 2]], dtype=torch.long)
            starts = torch.tensor([0, 30], dtype=torch.long)
            return ms_deform_attn(value, shapes, starts, loc, weights)

    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 36, 2, 4, generator=g), torch.rand(2, 7, 2, 2, 3, 2, generator=g) * 1.4 - 0.2,
            torch.rand(2, 7, 2, 2, 3, generator=g))
    path = str(tmp_path / "op.onnx")
    torch.onnx.export(Sample(), args, dynamo=True, custom_translation_table=translation_table()).save(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})[0]
    ref = ms_deform_attn_reference(args[0], torch.tensor([[5, 6], [3, 2]]), torch.tensor([0, 30]), *args[1:])
    assert got.shape == (2, 7, 8) and np.abs(got - ref.numpy()).max() <= 1e-5
