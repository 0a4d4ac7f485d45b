"""Environment report (like DeepSpeed's ds_report): what stm-dist can use on this machine."""
import importlib
import importlib.util
import os
import platform
import shutil
import sys


def _version(module_name):
    """Installed version of a module, or None, without letting a broken package crash the report."""
    if importlib.util.find_spec(module_name) is None:
        return None
    try:
        mod = importlib.import_module(module_name)
    except Exception as exc:  # a broken install is worth reporting, not dying on
        return f"import failed: {type(exc).__name__}: {exc}"
    return getattr(mod, "__version__", "unknown")


def _nvidia_apex():
    # The PyPI project called `apex` is an unrelated web toolkit; NVIDIA's has apex.optimizers.
    if importlib.util.find_spec("apex") is None:
        return "not installed (optional: fused optimizers used only if present)"
    if importlib.util.find_spec("apex.optimizers") is None:
        return "an unrelated package named 'apex' is installed (not NVIDIA apex); ignored"
    return "NVIDIA apex present"


def _deepspeed_ops():
    try:
        from deepspeed.git_version_info import installed_ops
    except Exception:
        return None
    return sorted(name for name, built in installed_ops.items() if built)


def collect():
    """The report as an ordered list of (section, [(key, value), ...])."""
    import torch

    from stm_dist import ops

    cuda_ok = torch.cuda.is_available()
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda_ok else []
    try:
        ext, refused = ops.extension_available(), None
    except ops.ExtensionBuildMismatch as err:  # built for another torch: report it, don't crash
        ext, refused = False, str(err)
    built_cuda = bool(torch.ops.stm_dist.built_with_cuda()) if ext else False
    ds_ops = _deepspeed_ops()
    return [
        ("system", [
            ("python", sys.version.split()[0]),
            ("platform", platform.platform()),
            ("cpu cores", os.cpu_count()),
        ]),
        ("torch", [
            ("torch", torch.__version__),
            ("torch CUDA build", torch.version.cuda or "no (CPU build)"),
            ("CUDA available", cuda_ok),
            ("visible GPUs", ", ".join(devices) if devices else "none"),
            ("nvcc", shutil.which("nvcc") or "not found"),
            ("torchvision", _version("torchvision")),
            ("timm", _version("timm")),
        ]),
        ("stm_dist._C", [
            ("extension loaded", ext if refused is None else f"no, refused: {refused}"),
            ("built with CUDA kernels", built_cuda),
            ("ms_deform_attn CPU kernel", ext and ops.kernel_available("ms_deform_attn", "CPU")),
            ("ms_deform_attn CUDA kernel", ext and ops.kernel_available("ms_deform_attn", "CUDA")),
        ]),
        ("training", [
            ("deepspeed", _version("deepspeed")),
            ("deepspeed prebuilt ops", ", ".join(ds_ops) if ds_ops else "none (ops compile on first use)"),
            ("apex", _nvidia_apex()),
        ]),
        ("data", [
            ("nvidia.dali", _version("nvidia.dali")),
            ("webdataset", _version("webdataset")),
        ]),
    ]


def format_report(sections):
    width = max(len(k) for _, items in sections for k, _ in items)
    lines = []
    for title, items in sections:
        lines.append(f"-- {title} " + "-" * max(0, width + 20 - len(title)))
        lines.extend(f"  {k:<{width}}  {'not installed' if v is None else v}" for k, v in items)
    return "\n".join(lines)
