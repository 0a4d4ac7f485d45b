"""torch.compile(fullgraph=True) traces every core mixer with no graph break, forward and backward.

`aot_eager` checks what can break (Dynamo tracing with fullgraph=True, AOT autograd of the
backward) for every mixer without generating kernels. `inductor` adds torch's own code
generation: one model covers it (Swin and Halo took 250 and 225 s each on the 2-core CI box, a
third of the whole suite, for no path of ours that aot_eager does not already trace; the GPU
check compiles them with inductor on a GPU).
"""
import pytest
import torch

from stm_dist.models import create_model


@pytest.mark.parametrize("stm, backend", [
    ("halo", "aot_eager"), ("swin", "aot_eager"), ("convnext", "aot_eager"),
    pytest.param("convnext", "inductor", marks=pytest.mark.slow),
])
def test_compile_fullgraph_forward_backward(stm, backend):
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
