"""EMA averages floating-point state only; Swin's integer index survives (spec §9.3)."""
import torch

from stm_dist.engine.ema import ModelEMA, model_state_tensors
from stm_dist.models import create_model


def test_ema_keeps_integer_buffers_and_averages_floats():
    torch.manual_seed(0)
    model = create_model("unified_swin_micro", num_classes=10, img_size=224)
    ints = {k: v.clone() for k, v in model.state_dict().items() if not v.is_floating_point()}
    assert any("relative_position_index" in k for k in ints)
    ema = ModelEMA(model_state_tensors(model), decay=0.9999)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model_state_tensors(model))
    for k, v in ema.state_dict().items():
        if k in ints:
            assert torch.equal(v, ints[k]), k  # timm 0.6.7's ModelEma truncated these to v - 1
        elif k in dict(model.named_parameters()):
            assert torch.allclose(v, before[k] + 1e-4, atol=1e-6), k
        assert v.dtype in (torch.float32, torch.int64, torch.bool), (k, v.dtype)
    fresh = create_model("unified_swin_micro", num_classes=10, img_size=224)
    fresh.load_state_dict(ema.state_dict())  # an EMA state is a loadable model state
