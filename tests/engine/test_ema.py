"""Sharded EMA: floating-point state averaged, integer buffers copied (spec §9.3), each rank's
slices reassemble into the single-rank average, and a saved state re-slices for another world."""
import torch

from stm_dist.engine.ema import ShardedEMA, assemble
from stm_dist.models import create_model


def _model():
    torch.manual_seed(0)
    return create_model("unified_swin_micro", num_classes=10, img_size=224)


def test_ema_keeps_integer_buffers_and_averages_floats():
    model = _model()
    ints = {k: v.clone() for k, v in model.state_dict().items() if not v.is_floating_point()}
    assert any("relative_position_index" in k for k in ints)
    ema = ShardedEMA(model, decay=0.9999)
    before = {k: v.clone() for k, v in ema.full_state().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    for k, v in ema.full_state().items():
        if k in ints:
            assert torch.equal(v, ints[k]), k  # timm 0.6.7's ModelEma truncated these to v - 1
        elif k in dict(model.named_parameters()):
            assert torch.allclose(v, before[k] + 1e-4, atol=1e-6), k
        assert v.dtype in (torch.float32, torch.int64, torch.bool), (k, v.dtype)
    fresh = create_model("unified_swin_micro", num_classes=10, img_size=224)
    fresh.load_state_dict(ema.full_state())  # an EMA state is a loadable model state


def test_rank_slices_reassemble_and_reslice_for_another_world():
    model = _model()
    ref = ShardedEMA(model, decay=0.5)
    shards = [ShardedEMA(model, decay=0.5, rank=r, world=3) for r in range(3)]
    assert sum(s.local_bytes() for s in shards) < 1.2 * ref.local_bytes()
    assert max(s.local_bytes() for s in shards) < 0.45 * ref.local_bytes()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5).add_(0.25)
    for e in [ref] + shards:
        e.update()
    full = assemble([s.state_dict() for s in shards])
    want = ref.full_state()
    assert full.keys() == want.keys()
    for k in want:
        assert torch.equal(full[k], want[k]), k
    two = [ShardedEMA(_model(), decay=0.5, rank=r, world=2) for r in range(2)]
    for t in two:
        t.load_state_dict([s.state_dict() for s in shards])
    again = assemble([t.state_dict() for t in two])
    for k in want:
        assert torch.equal(again[k], want[k]), k
