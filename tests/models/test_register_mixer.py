"""A mixer of one's own in one file (examples/pool_mixer.py, outside stm_dist/models): registry,
timm, errors that name the fix, and the pool mixer trained on the digits through stm-train (one
process), then evaluated, analysed and shown by stm-report, each finding the mixer through the
recipe. Both ranks of a `deepspeed` launch: tests/engine/test_matrix.py."""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch

import stm_dist.models as M
from stm_dist.models import MixerError, create_model, list_models, load_mixer_module, register_mixer
from stm_dist.report import paper
from side_by_side import finish, start

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POOL = os.path.join(REPO, "examples", "pool_mixer.py")
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def pool():
    return load_mixer_module(POOL)


def test_pool_mixer_file_is_short_and_outside_the_package():
    assert len(open(POOL).read().splitlines()) < 60
    assert not os.path.abspath(POOL).startswith(os.path.dirname(M.__file__))


def test_pool_mixer_registered_everywhere(pool):
    assert load_mixer_module(POOL) is pool  # loaded once
    assert {"unified_pool_micro", "unified_pool_tiny"} <= set(list_models("unified_pool_*"))
    assert M.mixers()["pool"] == ("micro", "tiny") and M.mixer_of("unified_pool_micro") == ("pool", "micro")
    assert {"unified_pool_micro", "unified_pool_tiny"} <= set(timm.list_models("unified_pool_*"))
    torch.manual_seed(0)
    ours = create_model("unified_pool_micro", num_classes=10).eval()
    via_timm = timm.create_model("unified_pool_micro", num_classes=10).eval()
    via_timm.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), via_timm(x))
        feats = timm.create_model("unified_pool_micro", features_only=True)(x)
    assert [f.shape[1] for f in feats] == [32, 64, 128, 256]
    assert via_timm.pretrained_cfg["url"] == ""  # nothing released
    assert paper.mixer_and_size("unified_pool_micro") == ("pool", "micro") and not paper.in_paper("unified_pool_micro")
    assert paper.paper_top1("unified_pool_micro") is None and paper.mixer_title("pool") == "pool"


class _Block(torch.nn.Module):
    def __init__(self, dim, **kw):
        super().__init__()
        self.proj = torch.nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        return x + self.proj(x)


def test_register_mixer_errors_name_the_fix(pool):
    with pytest.raises(MixerError, match=r"size 'micro': unknown key\(s\) \['dpth'\]"):
        register_mixer("toy", _Block, sizes={"micro": dict(dpth=(1, 1, 1, 1), dims=(8, 8, 8, 8))})
    with pytest.raises(MixerError, match="'depths' must be 4 positive ints"):
        register_mixer("toy", _Block, sizes={"micro": dict(depths=(1, 1, 1), dims=(8, 8, 8, 8))})
    with pytest.raises(MixerError, match="already registered with block .*PoolBlock; pass replace=True"):
        register_mixer("pool", _Block, sizes={"micro": dict(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8))})
    with pytest.raises(MixerError, match="already an alias of 'halo'"):
        register_mixer("halonet", _Block, sizes={"x": dict(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8))})
    with pytest.raises(MixerError, match="mixer name is lowercase"):
        register_mixer("Toy-1", _Block, sizes={"x": dict(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8))})
    assert "unified_toy_micro" not in list_models()


def test_register_mixer_toy_builds_and_trains_one_step():
    made = register_mixer("toy", _Block, sizes={"nano": dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 16))})
    assert list(made) == ["unified_toy_nano"]
    model = timm.create_model("unified_toy_nano", num_classes=3)
    loss = model(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_load_mixer_module_errors(tmp_path):
    with pytest.raises(MixerError, match="model.mixer_module: mixer file not found: nope/mixer.py"):
        load_mixer_module("nope/mixer.py", source="model.mixer_module")
    empty = tmp_path / "empty_mixer.py"
    empty.write_text("x = 1\n")
    with pytest.raises(MixerError, match="registered no mixer; call stm_dist.models.register_mixer"):
        load_mixer_module(str(empty))
    broken = tmp_path / "broken_mixer.py"
    broken.write_text("import not_a_module_anywhere\n")
    with pytest.raises(MixerError, match="broken_mixer.py failed to import: ModuleNotFoundError"):
        load_mixer_module(str(broken))
    with pytest.raises(MixerError, match="cannot import mixer module 'no_such.mixers'"):
        load_mixer_module("no_such.mixers")


def test_env_var_reaches_a_fresh_process():
    code = "import stm_dist.models as m; print(m.resolve_name('unified_pool_tiny'))"
    env = dict(os.environ, STM_MIXER_MODULES=POOL)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "unified_pool_tiny", r.stderr[-2000:]


def test_config_error_for_a_missing_mixer_file(tmp_path):
    r = subprocess.run([sys.executable, "-m", "stm_dist.cli.train", "--config", "configs/demo_digits.yaml",
                        "model.mixer_module=examples/no_such_mixer.py", "model.name=unified_pool_micro",
                        "--print-config"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "'model.mixer_module': mixer file not found: " in r.stderr and "no_such_mixer.py" in r.stderr


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from data_tools.demo_data import write_demo_source
    from data_tools.writer import create_shards

    root = tmp_path_factory.mktemp("digits")
    write_demo_source(str(root / "source"), size=32)
    for split in ("train", "val"):
        create_shards(str(root / "source"), split, str(root / "shards"), samples_per_shard=400, progress=False)
    return str(root / "shards")


def _env() -> dict:
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""), DS_ACCELERATOR="cpu",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("STM_MIXER_MODULES", None)  # the recipe key alone must bring the mixer to every rank
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _train_and_report(launch: list, digits, tmp_path, analyse: bool = False):
    run = tmp_path / "runs" / "unified_pool_micro"
    cmd = [*launch, "--config", "examples/configs/unified_pool_micro.yaml",
           f"run.out_dir={run}", f"data.train_shards={digits}", f"data.val_shards={digits}",
           "schedule.max_steps=2", "train.log_every=1", "data.eval_batch=150"]
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    train = [x for x in rows if x.get("kind") == "train"]
    assert [x["step"] for x in train][-1] == 2 and all(x["loss"] == x["loss"] for x in train)
    assert any(x.get("kind") == "eval" and x.get("top1") is not None for x in rows)
    extra = []
    # stm-analyze and stm-eval find the mixer in the recipe beside the checkpoint (no STM_MIXER_MODULES).
    # stm-eval runs beside the analysis and the report (neither reads what the other writes).
    evaluation = start([sys.executable, "-m", "stm_dist.cli.eval", "--model", "unified_pool_micro",
                        "--checkpoint", str(run / "best.pth"), "--data", digits, "--img-size", "32",
                        "--num-threads", "1", "--json", str(tmp_path / "eval.json")], cwd=REPO, env=_env())
    if analyse:
        an = tmp_path / "analyses" / "unified_pool_micro"
        r = subprocess.run([sys.executable, "-m", "stm_dist.cli.analyze", "erf", "--model", "unified_pool_micro",
                            "--checkpoint", str(run), "--data", digits, "--out", str(an), "--img-size", "64",
                            "--images", "2", "--batch", "2", "--num-threads", "0"], cwd=REPO,
                           env=_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        extra = ["--analyses", str(tmp_path / "analyses")]
    # stm-report in a fresh process: the mixer comes from the run's saved config.
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "stm_dist.cli.report", str(tmp_path / "runs"), "-o", str(out), *extra],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    e = finish(evaluation)
    assert e.returncode == 0, e.stdout[-3000:] + e.stderr[-3000:]
    best = json.loads((run / "best.pth.json").read_text())
    assert json.loads((tmp_path / "eval.json").read_text())["top1"] == best["top1"]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    md = (out / "report.md").read_text()
    if analyse:
        assert "pool micro" in md.split("## Analyses of the mixers")[1]
    row = next(line for line in md.splitlines() if "| unified_pool_micro |" in line)
    assert "| pool |" in row
    (entry,) = json.loads((out / "report.json").read_text())["runs"]
    assert (entry["mixer"], entry["size"], entry["paper_top1"]) == ("pool", "micro", None)
    assert entry["params"] == sum(p.numel() for p in create_model("unified_pool_micro", num_classes=10).parameters())
    return r


@pytest.mark.slow
def test_pool_mixer_trains_evaluates_and_shows_in_the_analyses_and_report(pool, digits, tmp_path):
    """One plain stm-train process, then stm-eval, stm-analyze and stm-report, each a fresh
    process finding the mixer through the recipe. (Both ranks of a `deepspeed` launch loading it
    through model.mixer_module, under every ZeRO stage: tests/engine/test_matrix.py.)"""
    _train_and_report([sys.executable, "-m", "stm_dist.cli.train"], digits, tmp_path, analyse=True)


def test_report_table_puts_a_registered_mixer_next_to_the_five():
    import dataclasses

    from stm_dist.report.collect import RunSummary
    from stm_dist.report.write import paper_table

    def run(model, top1):
        mixer, size = paper.mixer_and_size(model)
        blank = {f.name: None for f in dataclasses.fields(RunSummary)}
        return RunSummary(**dict(blank, name=model, model=model, mixer=mixer, size=size, imagenet1k=True,
                                 best_top1=top1, paper_top1=paper.paper_top1(model)))

    lines = paper_table([run("unified_swin_tiny", 81.0), run("unified_pool_tiny", 78.5)])
    assert lines[0] == "| size | U-HaloNet | U-PVT | U-Swin | U-ConvNeXt | U-InternImage | pool |"
    tiny = next(line for line in lines if line.startswith("| Tiny"))
    assert tiny.endswith("| 81.00 / 82.3 | – / 82.2 | – / 83.3 | 78.50 / – |")
