"""Build stm_dist and its compiled operator library stm_dist._C.

The C++ (CPU) kernels are always built. The CUDA kernels are built when torch is a CUDA build
and nvcc is found; STM_DIST_CUDA=0 forces them off, STM_DIST_CUDA=1 makes their absence an
error. The build log says which happened.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"[stm_dist setup] {msg}", file=sys.stderr, flush=True)


def _cuda_decision():
    """Return (build_cuda: bool, reason: str)."""
    want = os.environ.get("STM_DIST_CUDA", "auto").strip().lower()
    if want in ("0", "off", "false", "no"):
        return False, "disabled by STM_DIST_CUDA=0"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        problems.append("nvcc not found (set CUDA_HOME)")
    if problems:
        if want in ("1", "on", "true", "yes"):
            raise SystemExit("STM_DIST_CUDA=1 but CUDA kernels cannot be built: " + "; ".join(problems))
        return False, "; ".join(problems)
    return True, f"torch CUDA {torch.version.cuda}, nvcc at {CUDA_HOME}"


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpp = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cu = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    # -g0: Python's own CFLAGS (sysconfig) add -g, which doubles the compile time of these
    # template-heavy sources (CI builds them twice: the editable install and the wheel test)
    # for debug info nobody ships; a later -g0 overrides it.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-g0"]
    build_cuda, reason = _cuda_decision()
    if build_cuda and cu:
        _log(f"building CPU + CUDA kernels ({reason})")
        import torch

        # torch's CUDA headers include cusparse.h / cublas_v2.h; a minimal toolkit may lack
        # them, but torch's own nvidia-* wheels ship them.
        nv_inc = [
            d
            for pat in ("nvidia/cu*/include", "nvidia/*/include")
            for p in sys.path
            for d in glob.glob(os.path.join(p, pat))
        ]
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        return [
            CUDAExtension(
                "stm_dist._C",
                cpp + cu,
                include_dirs=[os.path.join(ROOT, "csrc")] + sorted(set(nv_inc)),
                define_macros=[("WITH_CUDA", None)],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-std=c++20"]},
                extra_link_args=["-fopenmp"],
            )
        ]
    _log(f"building CPU kernels only ({reason if not build_cuda else 'no CUDA sources'})")
    return [
        CppExtension(
            "stm_dist._C",
            cpp,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]


BUILD_RECORD = "_C_build.json"  # read back by stm_dist/ops/build_guard.py before loading _C


def _build_record():
    """What the library is compiled against; a torch with another version or ABI cannot load it
    safely (on the lent GPU a mismatched _C crashed the process instead of raising)."""
    import torch

    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
    }


def _record_path(library):
    return os.path.join(os.path.dirname(library), BUILD_RECORD)


def _replace(src, dst):
    # Copy then rename: processes that have the old library mapped keep their inode; copying over
    # it in place (what distutils does) can crash them.
    import shutil

    tmp = f"{dst}.tmp-{os.getpid()}"
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _build_ext():
    import json

    from torch.utils.cpp_extension import BuildExtension

    base = BuildExtension.with_options(use_ninja=True)

    class BuildExtWithRecord(base):
        """Writes _C_build.json beside every library it builds, and installs both atomically."""

        def build_extension(self, ext):
            library = self.get_ext_fullpath(ext.name)
            record = _build_record()
            try:
                with open(_record_path(library)) as f:
                    stale = json.load(f) != record
            except (OSError, ValueError):
                stale = True
            force, self.force = self.force, self.force or stale  # sources unchanged, torch not
            try:
                super().build_extension(ext)
            finally:
                self.force = force
            tmp = f"{_record_path(library)}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(record, f, indent=1)
                f.write("\n")
            os.replace(tmp, _record_path(library))
            _log(f"build record {record} -> {_record_path(library)}")

        def copy_file(self, infile, outfile, *args, **kwargs):
            # Used by the in-place (editable) install to put the library into the source tree.
            if not os.path.exists(_record_path(infile)) or not infile.endswith((".so", ".pyd")):
                return super().copy_file(infile, outfile, *args, **kwargs)
            _replace(infile, outfile)
            _replace(_record_path(infile), _record_path(outfile))
            return outfile, True

        def get_outputs(self):
            outputs = super().get_outputs()
            return outputs + sorted({_record_path(o) for o in outputs if o.endswith((".so", ".pyd"))})

    return BuildExtWithRecord


# The recipes, DeepSpeed configs and sweep files stay top-level folders of the checkout (users,
# docs and the slurm scripts name configs/x.yaml); a wheel carries them inside the package, as
# stm_dist/configs/ ..., where stm_dist/package_data.py looks for them (one level of subfolders:
# configs/detection/).
SHIPPED = {"configs": ["*.yaml", "*/*.yaml"], "ds_configs": ["*.json"], "sweeps": ["*.yaml"]}

setup(
    name="stm-dist",
    version="0.1.0",
    description="Spatial token mixers compared fairly: DeepSpeed training of the unified STM backbones",
    packages=find_packages(include=["stm_dist", "stm_dist.*", "data_tools", "data_tools.*"])
    + [f"stm_dist.{folder}" for folder in SHIPPED],
    package_dir={f"stm_dist.{folder}": folder for folder in SHIPPED},
    package_data={f"stm_dist.{folder}": patterns for folder, patterns in SHIPPED.items()},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "numpy",
        "pillow",
        "pyyaml>=6",
        "tqdm",
        "timm>=1.0,<2",
    ],
    extras_require={
        "train": ["deepspeed>=0.19,<0.20", "tensorboard", "matplotlib"],
        "data": ["nvidia-dali-cuda130>=2.4,<3", "webdataset>=1.0,<2"],
        "detection": ["pycocotools>=2.0.8"],
        "onnx": ["onnx", "onnxscript", "onnxruntime"],
        "test": ["pytest", "scikit-learn", "scikit-image"],
    },
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
    entry_points={
        "console_scripts": [
            "stm-env=stm_dist.cli.env:main",
            "stm-shards=data_tools.cli:main",
            "stm-sweep=stm_dist.cli.sweep:main",
            "stm-report=stm_dist.cli.report:main",
            "stm-train=stm_dist.cli.train:main",
            "stm-eval=stm_dist.cli.eval:main",
            "stm-export=stm_dist.cli.export:main",
            "stm-bench=stm_dist.cli.bench:main",
            "stm-analyze=stm_dist.cli.analyze:main",
        ]
    },
)
