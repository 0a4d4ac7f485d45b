"""Bad arguments to torch.ops.stm_dist.ms_deform_attn give errors that name the argument."""
import pytest
import torch

import stm_dist.ops as ops

from .conftest import build_inputs

pytestmark = pytest.mark.skipif(not ops.kernel_available("ms_deform_attn", "CPU"),
                                reason="stm_dist._C has no CPU kernel (extension not built)")


def _call(value, shapes, start, loc, attn):
    return torch.ops.stm_dist.ms_deform_attn(value, shapes, start, loc, attn)


def _base():
    return list(build_inputs(2, [(4, 5), (2, 2)], 2, 8, 3, 4, dtype=torch.float32))


CASES = [
    ("value rank", lambda a: a.__setitem__(0, a[0][0]), "value must be 4-D"),
    ("loc rank", lambda a: a.__setitem__(3, a[3][..., 0]), "sampling_locations must be 6-D"),
    ("attn rank", lambda a: a.__setitem__(4, a[4][..., 0]), "attention_weights must be 5-D"),
    ("loc heads", lambda a: a.__setitem__(3, a[3][:, :, :1]), "sampling_locations must be (N, Lq, M, L, P, 2)"),
    ("loc last dim", lambda a: a.__setitem__(3, torch.cat([a[3], a[3][..., :1]], -1)), "sampling_locations must be"),
    ("attn points", lambda a: a.__setitem__(4, a[4][..., :2]), "attention_weights must be (N, Lq, M, L, P)"),
    ("dtype mismatch", lambda a: a.__setitem__(3, a[3].double()), "sampling_locations has dtype"),
    ("attn dtype", lambda a: a.__setitem__(4, a[4].double()), "attention_weights has dtype"),
    ("int value", lambda a: a.__setitem__(0, a[0].int()), "value must be a floating tensor"),
    ("half on cpu", lambda a: [a.__setitem__(i, a[i].half()) for i in (0, 3, 4)], "float32, float64 or bfloat16"),
    ("shapes rank", lambda a: a.__setitem__(1, a[1].flatten()), "spatial_shapes must be (L, 2)"),
    ("shapes float", lambda a: a.__setitem__(1, a[1].float()), "spatial_shapes must be an integer tensor"),
    ("levels", lambda a: a.__setitem__(1, a[1][:1]), "spatial_shapes has 1 levels but sampling_locations has L = 2"),
    ("sum HW", lambda a: a.__setitem__(1, torch.tensor([[4, 5], [2, 3]])), "sum(H*W) = 26 positions but value has S = 24"),
    ("start index", lambda a: a.__setitem__(2, torch.tensor([0, 19])), "level_start_index[1] = 19"),
    ("start shape", lambda a: a.__setitem__(2, a[2][:1]), "level_start_index must be (L,)"),
    ("zero size level", lambda a: [a.__setitem__(1, torch.tensor([[0, 5], [4, 6]]))], "spatial_shapes[0] = (0, 5) must be positive"),
]


@pytest.mark.parametrize("name,mutate,message", CASES, ids=[c[0] for c in CASES])
def test_bad_argument_is_named(name, mutate, message):
    args = _base()
    mutate(args)
    with pytest.raises(RuntimeError) as err:
        _call(*args)
    assert message in str(err.value), str(err.value)


def test_backward_checks_grad_output():
    args = _base()
    with pytest.raises(RuntimeError, match=r"grad_output must be \(N, Lq, M\*D\)"):
        torch.ops.stm_dist.ms_deform_attn_backward(torch.zeros(2, 3, 5), *args)


def test_fake_kernel_reports_bad_rank_at_trace_time():
    value, shapes, start, loc, attn = _base()
    from torch._subclasses.fake_tensor import FakeTensorMode

    bad_loc = loc[..., 0]
    with FakeTensorMode() as mode, pytest.raises(Exception, match="sampling_locations must be 6-D"):
        v, s, i, l, a = [mode.from_tensor(t) for t in (value, shapes, start, bad_loc, attn)]
        torch.ops.stm_dist.ms_deform_attn(v, s, i, l, a)
