"""The CUDA kernels: compiled into this build for the archs asked for (cuda_build), equal to the CPU
kernel, and under torch.autocast equal to the pure-PyTorch reference (gpu)."""
import glob
import os
import re
import shutil
import subprocess

import pytest
import torch

import stm_dist
import stm_dist.ops as ops

from .conftest import build_inputs

CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
NVCC = shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) or shutil.which("nvcc")
TOOLCHAIN = torch.version.cuda is not None and NVCC is not None and os.environ.get("STM_DIST_CUDA", "auto") not in (
    "0", "off", "false", "no")


def _cuobjdump():
    # A minimal toolkit (as on the CI box) lacks cuobjdump; triton's wheel ships one.
    found = shutil.which("cuobjdump", path=os.path.dirname(NVCC)) or shutil.which("cuobjdump")
    if found is None:
        try:
            import triton
        except ImportError:
            return None
        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        found = cand if os.access(cand, os.X_OK) else None
    return found


def _asked_archs():
    """The cubins the build asked nvcc for: TORCH_CUDA_ARCH_LIST as setup.py reads it (tools/gpu_check.sh
    exports the lent card's own, from torch.cuda.get_device_capability), else setup.py's default."""
    spec = os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
    found = [re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", item) for item in re.split(r"[;\s]+", spec.strip())]
    if not found or not all(found):
        pytest.fail(f"TORCH_CUDA_ARCH_LIST={spec!r}: this test reads only numeric entries such as 9.0 or 9.0a")
    return [f"sm_{m[1]}{m[2]}{m[3]}" for m in found]


@pytest.mark.cuda_build
@pytest.mark.skipif(not TOOLCHAIN, reason="torch is not a CUDA build, nvcc is absent, or STM_DIST_CUDA=0")
def test_cuda_kernels_compiled_into_extension():
    assert ops.extension_available()
    assert torch.ops.stm_dist.built_with_cuda()
    for op in ("ms_deform_attn", "ms_deform_attn_backward"):
        assert ops.kernel_available(op, "CUDA"), op
        assert ops.kernel_available(op, "CPU"), op
    (so,) = glob.glob(os.path.join(os.path.dirname(stm_dist.__file__), "_C*.so"))
    cuobjdump = _cuobjdump()
    assert cuobjdump, "cuobjdump not found next to nvcc, on PATH, or in triton's NVIDIA backend"
    listing = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True, check=True).stdout
    for arch in _asked_archs():
        # \b: a 9.0 build must hold sm_90 itself, not only an sm_90a cubin (and the other way round).
        assert re.search(rf"\b{arch}\b", listing), f"no {arch} cubin in {so}:\n{listing}"


# (batch, levels, heads, head_dim, queries, points). Batch 129 and 300 were impossible with the
# original kernel (batches above 128 had to be multiples of 128). Head dims 16/32/64 take the
# vector path with shuffle reductions; 48 (fp32: 12 lanes) the atomic reduction; 6 the scalar path.
GPU_SHAPES = [
    (2, [(9, 9)], 4, 16, 81, 9),
    (3, [(6, 5), (3, 3), (2, 1)], 4, 32, 11, 4),
    (1, [(8, 8), (4, 4)], 2, 64, 17, 25),
    (2, [(5, 7)], 3, 48, 13, 9),
    (2, [(5, 7)], 2, 6, 13, 5),
    (129, [(4, 4)], 2, 16, 5, 9),
    (300, [(3, 3)], 4, 16, 4, 9),
]
# fp32 agrees with the CPU to rounding; fp16 / bf16 carry 11 / 8 significant bits, the CUDA kernel
# accumulates in float: bounds relative to the largest magnitude of each compared tensor.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _fwd_bwd(inputs, grad_out):
    value, shapes, start, loc, attn = [t.detach().clone() for t in inputs]
    leaves = [t.requires_grad_() for t in (value, loc, attn)]
    out = torch.ops.stm_dist.ms_deform_attn(leaves[0], shapes, start, leaves[1], leaves[2])
    out.backward(grad_out.to(out))
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"b{s[0]}-l{len(s[1])}-m{s[2]}-d{s[3]}-p{s[5]}")
def test_cuda_matches_cpu_kernel(shape, dtype):
    cpu = build_inputs(*shape, dtype=torch.float64, outside=0.1)
    # Round the inputs to the tested dtype first, so both kernels see the same numbers.
    cpu = [t.to(dtype).double() if t.is_floating_point() else t for t in cpu]
    grad_out = torch.randn(cpu[0].shape[0], cpu[3].shape[1], cpu[0].shape[2] * cpu[0].shape[3],
                           generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype).double()
    expected = _fwd_bwd(cpu, grad_out)
    gpu = [t.to("cuda", dtype) if t.is_floating_point() else t for t in cpu]
    got = _fwd_bwd(gpu, grad_out.cuda())
    for name, g, e in zip(("output", "grad value", "grad sampling_locations", "grad attention_weights"), got, expected):
        assert g.dtype == dtype and g.is_cuda, name
        err = (g.double().cpu() - e).abs().max().item()
        assert err <= REL_TOL[dtype] * max(e.abs().max().item(), 1e-3), f"{name}: max error {err}"


@pytest.mark.gpu
def test_cuda_level_table_on_gpu_and_strided_inputs():
    value, shapes, start, loc, attn = build_inputs(2, [(5, 6), (2, 3)], 4, 32, 7, 9, dtype=torch.float32)
    ref = torch.ops.stm_dist.ms_deform_attn(value, shapes, start, loc, attn)
    v = value.cuda().transpose(2, 3).contiguous().transpose(2, 3)
    out = torch.ops.stm_dist.ms_deform_attn(v, shapes.cuda(), start.cuda(), loc.cuda(), attn.cuda())
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_cuda_device_mismatch_is_named():
    value, shapes, start, loc, attn = build_inputs(1, [(4, 4)], 2, 16, 3, 4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="sampling_locations is on cpu but value is on cuda"):
        torch.ops.stm_dist.ms_deform_attn(value.cuda(), shapes, start, loc, attn.cuda())


def test_cuda_backward_alerts_before_its_atomics():
    """Source check (no GPU needed): the CUDA backward calls the deterministic-algorithms alert
    before it launches its atomic kernels, so torch.use_deterministic_algorithms(True) raises."""
    src = open(os.path.join(os.path.dirname(stm_dist.__file__), os.pardir, "csrc", "cuda",
                            "ms_deform_attn_cuda.cu")).read()
    body = src[src.index("ms_deform_attn_backward_cuda("):]
    body = body[:body.index("\n}\n")]
    alert = body.find('at::globalContext().alertNotDeterministic("ms_deform_attn_backward (CUDA)")')
    assert alert >= 0 and alert < body.index("<<<") and "atomicAdd" in src


@pytest.mark.gpu
def test_cuda_backward_raises_under_deterministic_algorithms():
    value, shapes, start, loc, attn = build_inputs(1, [(4, 4)], 2, 16, 3, 4, dtype=torch.float32, device="cuda")
    grad = torch.ones(1, 3, 32, device="cuda")
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        torch.ops.stm_dist.ms_deform_attn(value, shapes.cpu(), start.cpu(), loc, attn)  # forward: no atomics
        with pytest.raises(RuntimeError, match=r"ms_deform_attn_backward \(CUDA\) does not have a deterministic"):
            torch.ops.stm_dist.ms_deform_attn_backward(grad, value, shapes.cpu(), start.cpu(), loc, attn)
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_half_value_with_float32_geometry(dtype):
    """What autocast hands the CUDA kernel: a half-precision value, float32 locations and weights."""
    cpu = build_inputs(2, [(9, 9), (3, 4)], 4, 32, 11, 9, dtype=torch.float64, outside=0.1)
    cpu[0] = cpu[0].to(dtype).double()
    cpu[3], cpu[4] = cpu[3].float().double(), cpu[4].float().double()
    grad_out = torch.randn(2, 11, 128, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(dtype)
    expected = _fwd_bwd(cpu, grad_out.double())
    gpu = [cpu[0].to("cuda", dtype), cpu[1], cpu[2], cpu[3].to("cuda", torch.float32), cpu[4].to("cuda", torch.float32)]
    got = _fwd_bwd(gpu, grad_out.cuda())
    for name, g, e, dt in zip(("output", "grad value", "grad sampling_locations", "grad attention_weights"), got,
                              expected, (dtype, dtype, torch.float32, torch.float32)):
        assert g.dtype == dt, name
        err = (g.double().cpu() - e).abs().max().item()
        assert err <= REL_TOL[dtype] * max(e.abs().max().item(), 1e-3), f"{name}: max error {err}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_under_autocast_matches_reference(dtype):
    """What the DCNv3 mixer does on a GPU: float32 tensors into stm_dist.ops.ms_deform_attn under
    torch.autocast("cuda", dtype) (float32: no autocast), forward and backward, against the
    pure-PyTorch reference in float64 on the numbers the kernel was handed (value rounded to the
    autocast dtype, locations and weights float32)."""
    assert ops.kernel_available("ms_deform_attn", "CUDA"), "stm_dist._C has no CUDA kernel: the reference would run"
    cpu = build_inputs(2, [(9, 9), (5, 4), (2, 3)], 4, 32, 11, 9, dtype=torch.float32, outside=0.1)
    value, shapes, start, loc, attn = cpu
    grad_out = torch.randn(2, 11, 128, generator=torch.Generator().manual_seed(7)).to(dtype)
    leaves = [t.cuda().requires_grad_() for t in (value, loc, attn)]
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        out = ops.ms_deform_attn(leaves[0], shapes, start, leaves[1], leaves[2])
    assert out.dtype == dtype and out.is_cuda
    out.backward(grad_out.cuda())
    ref_leaves = [t.double().requires_grad_() for t in (value.to(dtype), loc, attn)]
    ref = ops.ms_deform_attn_reference(ref_leaves[0], shapes, start, ref_leaves[1], ref_leaves[2])
    ref.backward(grad_out.double())
    got = [out.detach()] + [t.grad for t in leaves]
    expected = [ref.detach()] + [t.grad for t in ref_leaves]
    for name, g, e in zip(("output", "grad value", "grad sampling_locations", "grad attention_weights"), got, expected):
        # Gradients reach the float32 leaves in float32: autocast's cast is part of the graph.
        assert g.dtype == (dtype if name == "output" else torch.float32), (name, g.dtype)
        err = (g.double().cpu() - e).abs().max().item()
        assert err <= REL_TOL[dtype] * max(e.abs().max().item(), 1e-3), f"{name}: max error {err}"
