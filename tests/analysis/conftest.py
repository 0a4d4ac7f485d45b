"""Fixtures of the analysis tests: the real digits as shards, a micro model whose head is fitted
to them in closed form (seconds, not the minutes of a training run), and the CLI as a user runs it."""
import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = "unified_convnext_micro"
SECOND = "unified_swin_micro"  # a second mixer for the report's side-by-side figures
HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "analyze_many.py")


def launch(args, nproc: int = 1, timeout: int = 300):
    """`python ARGS`, or `torchrun --nproc_per_node N ARGS` (gloo on the CPU), with one thread per
    process as the CI box needs."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=REPO,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    if nproc > 1:
        prefix = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", str(nproc),
                  "--master_port", str(_free_port())]
    else:
        prefix = [sys.executable]
    return subprocess.run(prefix + [str(a) for a in args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=timeout)


def run_analyze(*args):
    """stm-analyze as a user runs it (the console script needs a reinstall; the module does not)."""
    return launch(["-m", "stm_dist.cli.analyze", *args])


def _free_port():
    from stm_dist.engine.distributed import _free_port as free

    return free()


@contextlib.contextmanager
def single_thread():
    """One intra-op thread in this process: tests/conftest.py sets OMP_NUM_THREADS only after
    torch is imported, so torch starts with one thread per core, and on a busy 2-core box the
    two threads' hand-offs made these tests ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    """The real digits data set (1,497 train / 300 val, 32 px) as shards."""
    from data_tools.demo_data import write_demo_source
    from data_tools.writer import create_shards

    root = tmp_path_factory.mktemp("digits")
    with single_thread():
        write_demo_source(str(root / "source"), size=32)
        for split in ("train", "val"):
            create_shards(str(root / "source"), split, str(root / "shards"), samples_per_shard=400, progress=False)
    return str(root / "shards")


@pytest.fixture(scope="session")
def fitted(digits_shards, tmp_path_factory):
    """(model, checkpoint path): a random-init micro model whose classifier is fitted by ridge
    regression on 400 training digits, so its predictions mean something (well above chance)
    and attacks have something to break."""
    with single_thread():
        return _fit(digits_shards, tmp_path_factory)


def _fit(digits_shards, tmp_path_factory):
    from stm_dist.analysis.runner import ValImages
    from stm_dist.data.pil_reader import val_transform
    from stm_dist.models import create_model

    torch.manual_seed(0)
    model = create_model(MODEL, num_classes=10, img_size=32).eval()
    tf = val_transform(32, 0.875)
    data = ValImages(digits_shards, lambda img, i: tf(img), batch=100, split="train", limit=400)
    feats, labels = [], []
    with torch.no_grad():
        for _, _, images, y in data:
            feats.append(model.forward_head(model.forward_features(images), pre_logits=True).double())
            labels.append(y)
    X, y = torch.cat(feats), torch.cat(labels)
    X1 = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    Y = torch.nn.functional.one_hot(y, 10).double()
    W = torch.linalg.solve(X1.T @ X1 + 1e-3 * torch.eye(X1.shape[1], dtype=X.dtype), X1.T @ Y)
    with torch.no_grad():
        model.head.weight.copy_(W[:-1].T.float())
        model.head.bias.copy_(W[-1].float())
    path = tmp_path_factory.mktemp("model") / "fitted.pth"
    torch.save(model.state_dict(), path)
    return model, str(path)


def real_images():
    """Fixed real photos (scikit-image) at a few sizes and aspect ratios, RGB PIL images."""
    import warnings

    import skimage.data
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        photos = [skimage.data.chelsea(), skimage.data.astronaut(), skimage.data.coffee()]
    sizes = [(91, 60), (64, 64), (75, 111)]  # (width, height): landscape, square, portrait
    return [Image.fromarray(np.ascontiguousarray(p[..., :3])).resize(s, Image.BICUBIC) for p, s in zip(photos, sizes)]


def _many(argvs, nproc):
    proc = launch([HELPER, json.dumps(argvs)], nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


_COMMON = ["--img-size", "32", "--batch", "4", "--num-threads", "0"]


def _argvs(shards, ckpt, out, model=MODEL):
    # 13 / 11 / 7 images in batches of 4: odd counts, a short last batch, 2 ranks with unequal work
    common = ["--model", model, "--checkpoint", ckpt, "--data", shards] + _COMMON
    return [["invariance", "--type", "translation", "--limit", "13", "--out", out] + common,
            ["erf", "--images", "11", "--out", out] + common,
            ["robustness", "--limit", "7", "--pgd-steps", "2", "--out", out] + common]


@pytest.fixture(scope="session")
def outputs(digits_shards, fitted, tmp_path_factory):
    """The three analyses on the fitted model, 1 process and 2 processes, plus a second mixer
    (random init, 1 process) for the report. The 2-process run is `stm-analyze all`, so the
    1-process == 2-process tests also hold `all` to the three separate commands."""
    root = tmp_path_factory.mktemp("analyses")
    one, two = str(root / "one" / MODEL), str(root / "two" / MODEL)
    _many(_argvs(digits_shards, fitted[1], one) + _argvs(digits_shards, "random", str(root / "one" / SECOND), SECOND), 1)
    proc = launch(["-m", "stm_dist.cli.analyze", "all", "--types", "translation", "--limit", "13", "--images", "11",
                   "--robustness-limit", "7", "--pgd-steps", "2", "--erf-img-size", "32", "--out", two] + _COMMON + [
                   "--model", MODEL, "--checkpoint", fitted[1], "--data", digits_shards], 2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"root": str(root / "one"), "one": one, "two": two}
