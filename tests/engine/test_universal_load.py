"""After DeepSpeed's ZeRO-3 universal load (a world-size change), every optimizer partition
counts its own Adam steps: the loader hands all of them one step tensor, which torch's AdamW
then incremented once per parameter group per step."""
import types

import torch

from stm_dist.engine.run_checkpoints import _unshare_step_counts


def test_shared_step_counter_is_split_so_each_group_counts_one_step():
    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], lr=0.1, fused=True)
    a.grad, b.grad = torch.ones(4), torch.ones(4)
    opt.step()
    shared = torch.tensor(4.0)  # what the loader does: one tensor for every partition
    opt.state[a]["step"] = opt.state[b]["step"] = shared
    _unshare_step_counts(types.SimpleNamespace(optimizer=opt))
    opt.step()
    assert float(opt.state[a]["step"]) == float(opt.state[b]["step"]) == 5.0
    # Without the split one step moves the one counter by two.
    shared = torch.tensor(5.0)
    opt.state[a]["step"] = opt.state[b]["step"] = shared
    opt.step()
    assert float(shared) == 7.0
