"""Run as one plain process by test_compile_zero3.py: a small unified ConvNeXt under ZeRO 3
(flat blocks, the default fetch unit), three training steps eager and three torch.compile'd from the same
initial weights and batches; prints {"eager": [...], "compiled": [...]} losses as the last line.
On the CPU (`DS_ACCELERATOR=cpu python tests/engine/compile_zero3_worker.py`) it takes ~5 min on
2 cores, most of it compiling C++ kernels: too long for the suite, which runs it on GPUs only."""

import json

import torch

from stm_dist.engine.distributed import init
from stm_dist.engine.step import build_engine
from stm_dist.models import create_model


def losses(compile: bool, device) -> list:
    torch.manual_seed(0)
    # Four blocks of four widths: the one block class runs with four weight shapes per step.
    model = create_model("unified_convnext_micro", num_classes=10, img_size=32, depths=(1, 1, 1, 1),
                         dims=(8, 16, 32, 64), drop_path_rate=0.0)
    runner = build_engine(model, precision="fp32", zero_stage=3, global_batch=8, micro_batch=8,
                          compile=compile, channels_last=False)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(3):
        x = torch.randn(8, 3, 32, 32, generator=g).to(device)
        y = torch.nn.functional.one_hot(torch.randint(0, 10, (8,), generator=g), 10).float().to(device)
        out.append(float(runner.micro_step(x, y, first=True, last=True)))
    return out


if __name__ == "__main__":
    device = init()[2]
    print(json.dumps({"eager": losses(False, device), "compiled": losses(True, device)}))
