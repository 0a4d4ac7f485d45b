"""The wheel, installed where there is no source checkout: built from this tree (stm_dist._C
compiled, CPU kernels only), installed with `pip --no-index --no-deps` into a fresh venv that
borrows the big dependencies of the test's own environment, and run from a directory outside the
repository. The recipes, DeepSpeed configs and sweeps must come from the package itself.

The wheel is built by tests/wheel_build.py, started by tests/conftest.py once collection shows a
test here needs it (it compiles in the background while earlier tests run)."""
import glob
import os
import subprocess
import sys
import sysconfig

import pytest

from side_by_side import finish, start
from wheel_build import WHEEL_BUILD, Build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def wheel(request, tmp_path_factory) -> str:
    build = getattr(request.config, WHEEL_BUILD, None) or Build(str(tmp_path_factory.mktemp("wheel")), jobs=2)
    code, log = build.wait()
    assert code == 0, log
    out = build.out
    found = glob.glob(os.path.join(out, "stm_dist-*.whl"))
    assert len(found) == 1, os.listdir(out)
    return found[0]


@pytest.fixture(scope="session")
def venv(wheel, tmp_path_factory) -> dict:
    """A fresh venv holding only the wheel; torch, timm, DeepSpeed ... are the test environment's,
    reached through a folder of links to them (never to stm_dist's own editable install)."""
    root = tmp_path_factory.mktemp("venv")
    env_dir, deps = str(root / "env"), str(root / "deps")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", env_dir], check=True)
    ours = sysconfig.get_paths()["purelib"]
    os.makedirs(deps)
    for name in os.listdir(ours):
        if name.startswith(("stm_dist", "__editable__", "data_tools")) or name.endswith(".pth") or name == "__pycache__":
            continue
        os.symlink(os.path.join(ours, name), os.path.join(deps, name))
    py = os.path.join(env_dir, "bin", "python")
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "_stm_test_deps.pth"), "w") as f:
        f.write(deps + "\n")
    p = subprocess.run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    cwd = str(root / "elsewhere")
    os.makedirs(cwd)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=os.path.join(env_dir, "bin") + os.pathsep + "/usr/bin:/bin", OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu")
    return {"bin": os.path.join(env_dir, "bin"), "py": py, "purelib": purelib, "cwd": cwd, "env": env}


def _start(venv, *cmd):
    exe = cmd[0] if cmd[0] == venv["py"] else os.path.join(venv["bin"], cmd[0])
    return start([exe, *cmd[1:]], cwd=venv["cwd"], env=venv["env"])


def _run(venv, *cmd, timeout=300):
    return finish(_start(venv, *cmd), timeout)


@pytest.mark.slow
def test_the_wheel_is_what_runs(venv):
    code = ("import torch, stm_dist, stm_dist._C, stm_dist.package_data as d; print(stm_dist.__file__); "
            "print(d.folder('configs')); print(d.folder('ds_configs')); print(len(d.names('configs')))")
    p = _run(venv, venv["py"], "-c", code)
    assert p.returncode == 0, p.stderr[-3000:]
    where, configs, ds, n = p.stdout.split()
    pkg = os.path.join(venv["purelib"], "stm_dist")
    assert where == os.path.join(pkg, "__init__.py"), where
    assert configs == os.path.join(pkg, "configs") and ds == os.path.join(pkg, "ds_configs")
    assert int(n) == 47  # the 20 recipes, the demo's, and configs/detection/ (25 Mask R-CNN recipes, the demo's)
    assert not REPO.startswith(venv["cwd"]) and not os.path.exists(os.path.join(venv["cwd"], "configs"))


@pytest.mark.slow
def test_tools_start_and_resolve_recipes_without_the_checkout(venv):
    # Every command at once (each is one short process, mostly imports), checked in turn below.
    tools = ("stm-train", "stm-eval", "stm-export", "stm-report", "stm-sweep")
    helps = {tool: _start(venv, tool, "--help") for tool in tools}
    recipes = ("unified_swin_tiny", "configs/unified_swin_tiny.yaml")
    printed = {arg: _start(venv, "stm-train", "--config", arg, "--print-config", "optim.lr=2e-3") for arg in recipes}
    misspelled = _start(venv, "stm-train", "--config", "unified_swin_tiy")
    count = _start(venv, "stm-sweep", "expand", "paper", "--count")
    check = _start(venv, "stm-sweep", "expand", "sweeps/paper.yaml", "--check")

    for tool in tools:
        p = finish(helps[tool])
        assert p.returncode == 0 and "usage:" in p.stdout, (tool, p.stderr[-2000:])
        if tool == "stm-train":
            assert "recipe name" in p.stdout

    pkg = os.path.join(venv["purelib"], "stm_dist")
    for arg in recipes:
        p = finish(printed[arg])
        assert p.returncode == 0, p.stderr[-2000:]
        assert p.stdout.startswith(f"# {os.path.join(pkg, 'configs', 'unified_swin_tiny.yaml')}"), p.stdout[:300]
        # The recipe's `deepspeed.config: ds_configs/zero1_bf16.json`, from the package's copy.
        assert f"config: {os.path.join(pkg, 'ds_configs', 'zero1_bf16.json')}" in p.stdout
        assert "name: unified_swin_tiny" in p.stdout and "lr: 0.002" in p.stdout

    p = finish(misspelled)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and "close recipe names: unified_swin_tiny" in p.stderr, p.stderr

    p = finish(count)
    assert p.returncode == 0 and p.stdout.strip() == "20", p.stdout + p.stderr[-2000:]
    p = finish(check)
    assert p.returncode == 0, p.stderr[-2000:]


@pytest.mark.slow
def test_timm_builds_a_model_from_the_wheel(venv):
    code = ("import timm, torch, stm_dist.models; "
            "m = timm.create_model('unified_convnext_micro', num_classes=10).eval(); "
            "print(type(m).__module__, tuple(m(torch.randn(1, 3, 64, 64)).shape))")
    p = _run(venv, venv["py"], "-c", code)
    assert p.returncode == 0, p.stderr[-3000:]
    module, shape = p.stdout.split(" ", 1)
    assert module.startswith("stm_dist.models") and shape.strip() == "(1, 10)", p.stdout


def test_recipes_resolve_from_any_directory_in_the_checkout(tmp_path, monkeypatch):
    from stm_dist.engine.config import ConfigError, load, resolve_config

    monkeypatch.chdir(tmp_path)
    swin = os.path.join(REPO, "configs", "unified_swin_tiny.yaml")
    for arg in ("unified_swin_tiny", "unified_swin_tiny.yaml", "configs/unified_swin_tiny.yaml", swin):
        assert resolve_config(arg) == swin, arg
    assert resolve_config("unified_halonet_tiny") == os.path.join(REPO, "configs", "unified_halo_tiny.yaml")
    assert load("unified_swin_tiny").deepspeed.config == os.path.join(REPO, "ds_configs", "zero1_bf16.json")
    # A file in the working directory wins over the shipped one of the same path.
    os.makedirs("configs")
    with open(swin) as f, open("configs/unified_swin_tiny.yaml", "w") as g:
        g.write(f.read().replace("lr: 1.0e-3", "lr: 5.0e-4"))
    assert load("configs/unified_swin_tiny.yaml").optim.lr == 5e-4
    with pytest.raises(ConfigError, match=r"no recipe named 'unified_swin_tiy'; close recipe names: unified_swin_tiny"):
        resolve_config("unified_swin_tiy")
    with pytest.raises(ConfigError, match=r"config file not found: nowhere/x.yaml"):
        resolve_config("nowhere/x.yaml")
