"""A weights file that says what it is: timm configures the model from it (input size, crop,
class count), says when it replaces the head, and every unreadable or mismatched file is named
with what it is and why it cannot be used."""
import logging

import pytest
import timm
import torch

from stm_dist.models import CheckpointError, create_model, load_pretrained

MODEL = "unified_convnext_micro"


def _export(model, path, img_size, num_classes, crop_pct, fmt):
    """`model`'s weights written by stm-export's writer, as a 32-px run on 10 classes records them."""
    from stm_dist.engine.export import pretrained_cfg, write

    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    run_cfg = {"model": {"img_size": img_size, "num_classes": num_classes}, "data": {"crop_pct": crop_pct}}
    info = {"model": MODEL, "pretrained_cfg": pretrained_cfg(MODEL, sd, run_cfg), "source": "test", "step": 3,
            "ema": False}
    write(sd, str(path), info, fmt)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    torch.manual_seed(0)
    src = create_model(MODEL, num_classes=10, img_size=32).eval()
    out = tmp_path_factory.mktemp("weights")
    return src, {fmt: _export(src, out / f"w.{fmt}", 32, 10, 0.9, fmt) for fmt in ("safetensors", "pth")}


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_timm_takes_input_size_crop_and_classes_from_the_file(files, fmt):
    src, paths = files
    m = timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=paths[fmt])).eval()
    assert m.num_classes == 10 and m.get_classifier().out_features == 10
    data = timm.data.resolve_data_config({}, model=m)
    assert data["input_size"] == (3, 32, 32) and data["crop_pct"] == 0.9
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), src(x))  # the file's head, not a random one
    # The caller's word wins over the file's.
    m = timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=paths[fmt], crop_pct=1.0))
    assert timm.data.resolve_data_config({}, model=m)["crop_pct"] == 1.0


def test_the_model_is_built_for_the_files_input_size(tmp_path):
    """Swin's windows and relative-position tables depend on the input size: a 32-px file must
    give a model built at 32 px (a 224-px one would load resized tables, silently other logits)."""
    torch.manual_seed(0)
    src = create_model("unified_swin_micro", num_classes=10, img_size=32, layer_scale_init_value=1.0).eval()
    path = str(tmp_path / "swin32.safetensors")
    from stm_dist.engine.export import pretrained_cfg, write

    sd = {k: v.detach().clone().contiguous() for k, v in src.state_dict().items()}
    run_cfg = {"model": {"img_size": 32, "num_classes": 10}}
    write(sd, path, {"model": "unified_swin_micro", "pretrained_cfg": pretrained_cfg("unified_swin_micro", sd, run_cfg),
                     "source": "test", "step": 1, "ema": False}, "safetensors")
    m = timm.create_model("unified_swin_micro", pretrained=True, pretrained_cfg_overlay=dict(file=path)).eval()
    assert m.img_size == (32, 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), src(x))


def test_a_replaced_head_is_a_warning_naming_both_counts(files, caplog):
    src, paths = files
    with caplog.at_level(logging.WARNING):
        m = timm.create_model(MODEL, pretrained=True, num_classes=5,
                              pretrained_cfg_overlay=dict(file=paths["safetensors"]))
    assert m.num_classes == 5
    text = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "10" in text and "5" in text and "w.safetensors" in text and "head" in text, text
    # A release-style file without metadata: the class count is the head's row count.
    bare = paths["pth"].replace("w.pth", "bare.pth")
    torch.save({"model": src.state_dict()}, bare)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        m = timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=bare))
    assert m.num_classes == 10 and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    with caplog.at_level(logging.WARNING):
        m = timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=dict(state_dict=src.state_dict()))
    assert m.num_classes == 10


def test_a_file_of_another_model_names_that_model(files):
    _, paths = files
    for path in paths.values():
        with pytest.raises(CheckpointError, match=rf"{path}.*unified_convnext_micro.*not unified_swin_micro"):
            timm.create_model("unified_swin_micro", pretrained=True, pretrained_cfg_overlay=dict(file=path))
        with pytest.raises(CheckpointError, match=r"holds weights of unified_convnext_micro"):
            load_pretrained(create_model("unified_swin_micro", num_classes=10), path)


def test_a_truncated_safetensors_names_the_path(files, tmp_path):
    _, paths = files
    data = open(paths["safetensors"], "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:len(data) // 2])
    for load in (lambda: timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=str(cut))),
                 lambda: load_pretrained(create_model(MODEL, num_classes=10), str(cut))):
        with pytest.raises(CheckpointError, match=rf"{cut}.*truncated.*{len(data) // 2} of {len(data)} bytes"):
            load()


def test_unreadable_files_say_what_they_are(files, tmp_path):
    m = create_model(MODEL, num_classes=10)
    cases = {
        "garbage.pth": (b"hello world, not weights\n", r"a text file starting 'hello world"),
        "empty.pth": (b"", r"empty"),
        "lfs.pth": (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 12\n", r"Git LFS pointer"),
        "page.pth": (b"<!DOCTYPE html><html><body>Not Found</body></html>", r"HTML page"),
        "cut.pth": (open(files[1]["pth"], "rb").read()[:100000], r"zip archive.*truncated or damaged"),
    }
    for name, (data, what) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        for load in (lambda: load_pretrained(m, str(path)),
                     lambda: timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))):
            with pytest.raises(CheckpointError, match=rf"{path}: .*{what}") as e:
                load()
            assert "101" not in str(e.value)
