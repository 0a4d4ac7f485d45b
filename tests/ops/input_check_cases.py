"""Bad arguments to torch.ops.stm_dist.ms_deform_attn{,_backward}, run as a script in a child process.

Run by test_input_checks.py: a build that crashes the process on an argument error (as one did on
the lent GPU) then fails the case that crashed instead of killing the test session. Prints one
JSON line when a case starts and one with its outcome, flushed, so the parent can tell which
case a crash happened in.
"""
import json
import sys

import torch

def base_inputs(device="cpu"):
    gen = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[4, 5], [2, 2]], dtype=torch.long)
    start = torch.tensor([0, 20], dtype=torch.long)
    value = torch.randn(2, 24, 2, 8, generator=gen)
    loc = torch.rand(2, 3, 2, 2, 4, 2, generator=gen)
    attn = torch.rand(2, 3, 2, 2, 4, generator=gen)
    # Level tables stay on the CPU, as callers are told to keep them.
    return [value.to(device), shapes, start, loc.to(device), attn.to(device)]


def _set(i, fn):
    def mutate(a):
        a[i] = fn(a)
    return mutate


def _halves(a):
    for i in (0, 3, 4):
        a[i] = a[i].half()


# (name, mutation of the five forward arguments, text the error must contain)
CASES = [
    ("value rank", _set(0, lambda a: a[0][0]), "value must be 4-D"),
    ("loc rank", _set(3, lambda a: a[3][..., 0]), "sampling_locations must be 6-D"),
    ("attn rank", _set(4, lambda a: a[4][..., 0]), "attention_weights must be 5-D"),
    ("loc heads", _set(3, lambda a: a[3][:, :, :1]), "sampling_locations must be (N, Lq, M, L, P, 2)"),
    ("loc last dim", _set(3, lambda a: torch.cat([a[3], a[3][..., :1]], -1)), "sampling_locations must be"),
    ("attn points", _set(4, lambda a: a[4][..., :2]), "attention_weights must be (N, Lq, M, L, P)"),
    ("dtype mismatch", _set(3, lambda a: a[3].double()), "sampling_locations has dtype Double but value has dtype Float"),
    ("attn dtype", _set(4, lambda a: a[4].double()), "attention_weights has dtype Double but sampling_locations"),
    ("float32 locations next to float64 value", lambda a: [a.__setitem__(0, a[0].double()), a.__setitem__(4, a[4].double())],
     "sampling_locations has dtype Float but value has dtype Double"),
    ("bf16 locations next to float32 value", lambda a: [a.__setitem__(i, a[i].bfloat16()) for i in (3, 4)],
     "sampling_locations has dtype BFloat16 but value has dtype Float"),
    ("int value", _set(0, lambda a: a[0].int()), "value must be a floating tensor"),
    ("shapes rank", _set(1, lambda a: a[1].flatten()), "spatial_shapes must be (L, 2)"),
    ("shapes float", _set(1, lambda a: a[1].float()), "spatial_shapes must be an integer tensor"),
    ("levels", _set(1, lambda a: a[1][:1]), "spatial_shapes has 1 levels but sampling_locations has L = 2"),
    ("sum HW", _set(1, lambda a: torch.tensor([[4, 5], [2, 3]])), "sum(H*W) = 26 positions but value has S = 24"),
    ("start index", _set(2, lambda a: torch.tensor([0, 19])), "level_start_index[1] = 19"),
    ("start shape", _set(2, lambda a: a[2][:1]), "level_start_index must be (L,)"),
    ("zero size level", _set(1, lambda a: torch.tensor([[0, 5], [4, 6]])), "spatial_shapes[0] = (0, 5) must be positive"),
    ("float16 accepted", _halves, None),  # a supported dtype: must not raise
]
# Backward-only: grad_output is checked like the other inputs.
BACKWARD_CASES = [
    ("grad_output shape", lambda: torch.zeros(2, 3, 5), "grad_output must be (N, Lq, M*D)"),
    ("grad_output dtype", lambda: torch.zeros(2, 3, 16, dtype=torch.float64), "grad_output has dtype Double"),
]
# Where a GPU is visible the same cases run on CUDA tensors too (the crash seen on the lent GPU).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
NAMES = [f"{c[0]} [{d}]" for d in DEVICES for c in CASES + BACKWARD_CASES]


def _run(name, call, expect):
    print(json.dumps({"start": name}), flush=True)
    try:
        call()
    except RuntimeError as err:
        message = str(err).splitlines()[0]
        ok = expect is not None and expect in str(err)
        print(json.dumps({"case": name, "ok": ok, "raised": True, "message": message}), flush=True)
        return
    print(json.dumps({"case": name, "ok": expect is None, "raised": False, "message": ""}), flush=True)


def main():
    import stm_dist.ops as ops

    if not ops.kernel_available("ms_deform_attn", "CPU"):
        print(json.dumps({"unavailable": "stm_dist._C has no CPU kernel"}), flush=True)
        return 0
    op, bwd = torch.ops.stm_dist.ms_deform_attn, torch.ops.stm_dist.ms_deform_attn_backward
    for device in DEVICES:
        for name, mutate, expect in CASES:
            def call(mutate=mutate, device=device):
                args = base_inputs(device)
                mutate(args)
                op(*args)
            _run(f"{name} [{device}]", call, expect)
        for name, grad, expect in BACKWARD_CASES:
            _run(f"{name} [{device}]", lambda: bwd(grad().to(device), *base_inputs(device)), expect)
    return 0


if __name__ == "__main__":
    sys.exit(main())
