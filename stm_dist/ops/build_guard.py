"""Refuse to load a stm_dist._C that was built for another torch.

setup.py writes `_C_build.json` beside the library: the torch version, its CUDA version and the
C++ ABI it was compiled against. A library built for one torch and loaded by another may crash
the process (seen on the lent GPU: torch 2.11 loading a build for 2.14 died on the first argument
error) or lose its kernels, and the model would then run the 5-10x slower reference without a word.
So the record is compared with the running torch *before* the library is loaded, and any
difference is an error naming both sides and the rebuild command.

A library without a record (built before records existed, or copied without it) is refused
too: nothing says which torch it was built for, and finding out by loading it is what crashes.
"""
import importlib.util
import json
import os

RECORD = "_C_build.json"
REBUILD = ("rebuild it from the checkout with `pip install --no-build-isolation --no-deps -e .` "
           "(`make test` rebuilds it too)")


class ExtensionBuildMismatch(RuntimeError):
    """stm_dist._C exists but cannot be trusted with the running torch."""


def running_build():
    import torch

    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
    }


def _describe(rec):
    cuda = rec.get("cuda") or "none"
    return f"torch {rec.get('torch')} (CUDA {cuda}, C++11 ABI {int(bool(rec.get('cxx11_abi')))})"


def library_path():
    """Path of the built stm_dist._C, or None when it has not been built. Does not load it."""
    try:
        spec = importlib.util.find_spec("stm_dist._C")
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin else None


def check(library):
    """Raise ExtensionBuildMismatch unless the record beside `library` matches the running torch."""
    record_path = os.path.join(os.path.dirname(library), RECORD)
    now = running_build()
    try:
        with open(record_path) as f:
            built = json.load(f)
        if not isinstance(built, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        raise ExtensionBuildMismatch(
            f"stm_dist._C at {library} has no build record {record_path}: it was built before "
            f"build records existed or copied without it, so it cannot be checked against this "
            f"process's {_describe(now)}; {REBUILD}") from None
    except (OSError, ValueError) as err:
        raise ExtensionBuildMismatch(f"stm_dist._C build record {record_path} is unreadable ({err}); {REBUILD}") from None
    differs = [key for key in now if built.get(key) != now[key]]
    if differs:
        raise ExtensionBuildMismatch(
            f"stm_dist._C at {library} was built for {_describe(built)} but this process runs "
            f"{_describe(now)} ({', '.join(differs)} differ{'s' if len(differs) == 1 else ''}); "
            f"loading it could crash the process or run without kernels; {REBUILD}")


def load():
    """Import stm_dist._C after checking its build record. False when no library is built; raises
    ExtensionBuildMismatch when one is built but is not for this torch or fails to load."""
    library = library_path()
    if library is None:
        return False
    check(library)
    try:
        from stm_dist import _C  # noqa: F401  (its static initialisers register the operators)
    except ImportError as err:
        raise ExtensionBuildMismatch(f"stm_dist._C at {library} matches its build record but failed to "
                                     f"load: {err}; {REBUILD}") from err
    return True
