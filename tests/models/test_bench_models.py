"""`stm-bench models`: the dispatcher finds the subcommand and a tiny real run writes CSV + PNG."""
import csv

import pytest

from stm_dist.cli import bench


def test_dispatcher_lists_and_rejects():
    assert "models" in bench.subcommands()
    with pytest.raises(SystemExit):
        bench.main(["no-such-benchmark"])
    with pytest.raises(SystemExit, match="multiple of 32"):
        bench.main(["models", "--img-size", "40"])


def test_tiny_eager_run_writes_csv_and_png(tmp_path, capsys):
    # Without a checkout of the original (as in CI) the bench says so and times ours only.
    rc = bench.main(["models", "--models", "unified_convnext_micro", "--modes", "eager", "--batch", "2",
                     "--img-size", "32", "--iters", "1", "--warmup", "1", "--threads", "1",
                     "--original", str(tmp_path / "missing"), "--out-dir", str(tmp_path)])
    assert rc == 0
    assert "original code not available" in capsys.readouterr().out
    assert not (tmp_path / "compare.csv").exists()
    rows = list(csv.DictReader(open(tmp_path / "models.csv")))
    assert len(rows) == 1 and rows[0]["model"] == "unified_convnext_micro" and not rows[0]["error"]
    assert float(rows[0]["img_per_s"]) > 0 and float(rows[0]["peak_mem_mib"]) > 0
    assert float(rows[0]["params_m"]) == pytest.approx(4.44, abs=0.01)
    assert (tmp_path / "models.png").stat().st_size > 1000


def _fake_original(root):
    """A stand-in checkout with the original's layout whose factory builds our ConvNeXt, and a
    stand-in 'timm 0.6' that the factory must see instead of the installed timm."""
    models = root / "checkout" / "classification" / "models"
    (models / "model_factory").mkdir(parents=True)
    (models / "meta_arch.py").write_text("")
    (models / "__init__.py").write_text("raise ImportError('package __init__ must not run')\n")
    (models / "model_factory" / "__init__.py").write_text("raise ImportError('must not run')\n")
    (models / "model_factory" / "convnext_factory.py").write_text(
        "import timm\nfrom timm.models import register_model\nfrom stm_dist.models import create_model\n"
        "SEEN_TIMM = timm.__version__\n\n@register_model\n"
        "def unified_convnext_micro(pretrained=False, **kw):\n"
        "    return create_model('unified_convnext_micro', **kw)\n")
    fake = root / "timm06" / "timm"
    (fake / "models").mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '0.6-fake'\n")
    (fake / "models" / "__init__.py").write_text("def register_model(fn):\n    return fn\n")
    return root / "checkout", root / "timm06"


def test_loads_original_beside_ours_with_its_own_timm(tmp_path):
    import sys

    import timm

    from stm_dist.bench.original import OriginalUnavailable, load_factory

    checkout, timm06 = _fake_original(tmp_path)
    fn = load_factory(str(checkout), "unified_convnext_micro", str(timm06))
    assert fn.__globals__["SEEN_TIMM"] == "0.6-fake"
    assert sys.modules["timm"] is timm and timm.__version__ != "0.6-fake"  # ours is back
    with pytest.raises(OriginalUnavailable, match="swin_factory"):
        load_factory(str(checkout), "unified_swin_micro", str(timm06))
    with pytest.raises(OriginalUnavailable, match="not an STM-Evaluation checkout"):
        load_factory(str(tmp_path), "unified_swin_micro")


def test_compare_run_times_both_side_by_side(tmp_path):
    checkout, timm06 = _fake_original(tmp_path)
    rc = bench.main(["models", "--models", "unified_convnext_micro", "--batch", "2", "--img-size", "32",
                     "--iters", "1", "--warmup", "1", "--rounds", "2", "--threads", "1",
                     "--original", str(checkout), "--original-timm", str(timm06),
                     "--out-dir", str(tmp_path / "out")])
    assert rc == 0
    (row,) = list(csv.DictReader(open(tmp_path / "out" / "compare.csv")))
    assert not row["error"] and not row["note"]
    assert float(row["ours_ms"]) > 0 and float(row["original_ms"]) > 0
    assert float(row["speedup"]) == pytest.approx(float(row["original_ms"]) / float(row["ours_ms"]), rel=0.01)
    assert float(row["max_abs_diff"]) == 0.0  # same weights, same code: the same function
