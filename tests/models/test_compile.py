"""torch.compile(fullgraph=True) traces every core mixer with no graph break, forward and backward.

`aot_eager` checks what can break (Dynamo tracing with fullgraph=True, AOT autograd of the
backward) for every mixer without generating kernels. Inductor's code generation is not run
here: on this 2-core CPU a cold compile of even a one-block-per-stage ConvNeXt took 150-300 s
(the whole micro model 380-890 s), a tenth of the suite, for C++ kernels no CPU run uses
(`train.compile` is off on the CPU). On a GPU, where `train.compile` is on, tools/gpu_check.sh
compiles the tiny models with inductor inside the engine (ConvNeXt and Swin first).
"""
import pytest
import torch

from stm_dist.models import create_model


@pytest.mark.parametrize("stm", ["halo", "swin", "convnext"])
def test_compile_fullgraph_forward_backward(stm, backend="aot_eager"):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_model(f"unified_{stm}_micro", num_classes=10).train()
    # 96 px: Halo and Swin both pad at some stage, Swin's shifted stages use run-time masks.
    x = torch.randn(1, 3, 96, 96)
    eager = model(x)
    eager.sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    out = torch.compile(model, fullgraph=True, backend=backend)(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    for (name, p), g in zip(model.named_parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-6, msg=name)
