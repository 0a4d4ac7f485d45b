"""stm-shards create/verify on real images: validation, re-encoding, determinism, resume, damage."""
import hashlib
import io
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from data_tools.tar_index import parse_index, scan_tar
from tests.data.conftest import PY, real_photos, run_cli, subprocess_env


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _shard_hashes(d, split="train"):
    return {p: _sha(os.path.join(d, p)) for p in sorted(os.listdir(d)) if p.startswith(split + "-")}


def test_manifest_index_and_verify(digits_shards, tmp_path):
    man = json.loads((digits_shards / "train.json").read_text())
    assert man["num_samples"] == 1497 and man["num_classes"] == 10 and man["seed"] == 0
    assert man["classes"] == [str(i) for i in range(10)] and sum(man["class_counts"]) == 1497
    assert [s["samples"] for s in man["shards"]] == [400, 400, 400, 297] and man["skipped"] == []
    for sh in man["shards"]:
        tar = digits_shards / sh["name"]
        assert _sha(tar) == sh["sha256"] and tar.stat().st_size == sh["bytes"]
        # Our index must be what DALI's own tool writes for the same tar.
        out = tmp_path / "ref.idx"
        subprocess.run([os.path.join(os.path.dirname(PY), "wds2idx"), str(tar), str(out)], check=True,
                       capture_output=True)
        assert out.read_bytes() == (digits_shards / sh["index_file"]).read_bytes()
    # Samples are shuffled across shards: the first shard holds all ten classes.
    labels = set()
    first = scan_tar(str(digits_shards / "train-000000.tar"))
    with open(digits_shards / "train-000000.tar", "rb") as f:
        for s in first[:100]:
            ext, off, size, _ = s[0]
            f.seek(off)
            labels.add(int(f.read(size)))
    assert labels == set(range(10))
    assert run_cli("verify", digits_shards, "--quiet") == 0


def _bad_source(root):
    """ImageNet layout with one of each problem case, built from real photos."""
    photos = real_photos(64)
    files = {}
    for k, (name, a) in enumerate(photos[:4]):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=90)
        files[f"good/{name}.JPEG"] = (buf.getvalue(), 0)
    good = files[f"good/{photos[0][0]}.JPEG"][0]
    files["bad/truncated.JPEG"] = (good[: len(good) // 2], 1)
    files["bad/empty.JPEG"] = (b"", 1)
    files["bad/garbage.JPEG"] = (bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8)), 1)
    for kind, mode, fmt in (("png", "RGBA", "PNG"), ("cmyk", "CMYK", "JPEG"), ("gray", "L", "JPEG")):
        buf = io.BytesIO()
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90 degrees to display; chelsea is not square
        Image.fromarray(photos[0][1]).convert(mode).save(buf, format=fmt, exif=exif.tobytes())
        files[f"conv/{kind}.JPEG"] = (buf.getvalue(), 2)  # ImageNet's PNG is also named .JPEG
    os.makedirs(root / "meta")
    lines = []
    for rel, (data, label) in files.items():
        p = root / "train" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        lines.append(f"{rel} {label}")
    lines.append("bad/missing.JPEG 1")
    (root / "meta" / "train.txt").write_text("\n".join(lines) + "\n")


def test_bad_inputs_skipped_or_reencoded(tmp_path, capsys):
    _bad_source(tmp_path / "src")
    assert run_cli("create", "--src", tmp_path / "src", "--split", "train", "--out", tmp_path / "out",
                   "--samples-per-shard", 3, "--workers", 2, "--no-progress") == 0
    man = json.loads((tmp_path / "out" / "train.json").read_text())
    reasons = {s["path"]: s["reason"] for s in man["skipped"]}
    assert set(reasons) == {"bad/truncated.JPEG", "bad/empty.JPEG", "bad/garbage.JPEG", "bad/missing.JPEG"}
    assert "truncated" in reasons["bad/truncated.JPEG"] and reasons["bad/empty.JPEG"] == "empty file"
    assert reasons["bad/missing.JPEG"] == "missing file"
    # Grayscale JPEGs are kept as they are (DALI decodes them to RGB); the rest is re-encoded
    # with its EXIF rotation applied, since the new file carries no EXIF.
    assert man["counts"]["reencoded_by_kind"] == {"cmyk": 1, "format-png": 1}
    assert man["num_samples"] == 7 and man["class_counts"] == [4, 0, 3]
    stored = {}
    for tar in sorted((tmp_path / "out").glob("train-*.tar")):
        with open(tar, "rb") as f:
            for s in scan_tar(str(tar)):
                ext, off, size, name = s[1]
                f.seek(off)
                stored[name.split("_", 1)[1].split(".")[0]] = f.read(size)
    src_train = tmp_path / "src" / "train" / "conv"
    assert stored["gray"] == (src_train / "gray.JPEG").read_bytes()
    w, h = Image.open(src_train / "cmyk.JPEG").size
    assert w != h and Image.open(io.BytesIO(stored["cmyk"])).size == (h, w)
    assert Image.open(io.BytesIO(stored["png"])).size == (h, w) and Image.open(io.BytesIO(stored["png"])).mode == "RGB"
    # Every stored image is an RGB JPEG that decodes (verify --full decodes all of them).
    assert run_cli("verify", tmp_path / "out", "--full", "--quiet") == 0
    # Output does not depend on the number of workers.
    assert run_cli("create", "--src", tmp_path / "src", "--split", "train", "--out", tmp_path / "out1",
                   "--samples-per-shard", 3, "--workers", 1, "--no-progress") == 0
    assert _shard_hashes(tmp_path / "out") == _shard_hashes(tmp_path / "out1")
    # --strict stops at the first unusable input and names it.
    capsys.readouterr()
    assert run_cli("create", "--src", tmp_path / "src", "--split", "train", "--out", tmp_path / "strict",
                   "--samples-per-shard", 3, "--strict", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "--strict" in err and str(tmp_path / "src" / "train" / "bad") in err


def test_interrupted_create_resumes_to_identical_shards(digits_shards, tmp_path):
    src = digits_shards.parent / "src"
    args = [PY, "-m", "data_tools.cli", "create", "--src", str(src), "--split", "val", "--out", str(tmp_path / "cut"),
            "--samples-per-shard", "64", "--workers", "2", "--no-progress"]
    # Die (os._exit, like a kill) halfway through the third shard.
    r = subprocess.run(args, env=subprocess_env(STM_SHARDS_FAIL_AFTER_SHARDS="2"), capture_output=True, text=True)
    assert r.returncode == 75, r.stderr
    left = sorted(os.listdir(tmp_path / "cut"))
    assert [p for p in left if p.endswith(".tar")] == ["val-000000.tar", "val-000001.tar"]
    assert ".val-000002.tar.tmp" in left and "val.json" not in left
    before = _shard_hashes(tmp_path / "cut", "val")
    assert len(before) == 4
    r = subprocess.run(args, env=subprocess_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    after = _shard_hashes(tmp_path / "cut", "val")
    assert {k: after[k] for k in before} == before  # finished shards were kept, not rewritten
    # Only the (unlocked) lock file stays behind: no temporaries, no progress records.
    assert [p for p in os.listdir(tmp_path / "cut") if p.startswith(".") or p.endswith(".tmp")] == [".val.lock"]
    assert run_cli("create", "--src", src, "--split", "val", "--out", tmp_path / "whole", "--samples-per-shard", 64,
                   "--workers", 1, "--no-progress") == 0
    assert after == _shard_hashes(tmp_path / "whole", "val") and len(after) == 10  # 5 tars + 5 indexes
    # A resumed run with other settings is refused, naming the setting.
    assert run_cli("create", "--src", src, "--split", "val", "--out", tmp_path / "cut", "--seed", 1,
                   "--no-progress") == 2


def test_verify_names_damaged_shards(digits_shards, tmp_path, capsys):
    d = tmp_path / "copy"
    shutil.copytree(digits_shards, d)
    tar = d / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[: 700_000])  # cut mid-member
    idx = d / "train-000002.idx"
    entries = parse_index(idx.read_text())
    entries[5], entries[6] = entries[6], entries[5]  # plausible-looking but wrong index
    idx.write_text("v1.2 %d\n" % len(entries) + "".join(
        " ".join(f"{e} {o} {s} {n}" for e, o, s, n in ent) + "\n" for ent in entries))
    capsys.readouterr()
    assert run_cli("verify", d, "--quiet") == 1
    err = capsys.readouterr().err
    assert "BAD train-000001.tar" in err and "BAD train-000002.tar" in err
    assert "does not match the tar" in err
    assert "train-000000.tar" not in err and "train-000003.tar" not in err


def test_second_create_on_one_output_is_refused(digits_shards, tmp_path, capsys):
    import fcntl

    src = digits_shards.parent / "src"
    out = tmp_path / "out"
    out.mkdir()
    args = ["create", "--src", src, "--split", "val", "--out", out, "--samples-per-shard", 100, "--no-progress"]
    # A lock left by a dead run (a pid that is not running, no flock held) does not block.
    (out / ".val.lock").write_text("999999999\n")
    with open(out / ".val.lock", "r+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running create holds
        held.truncate()
        held.write("4242\n")
        held.flush()
        capsys.readouterr()
        assert run_cli(*args) == 2
        err = capsys.readouterr().err
        assert "another `stm-shards create` (pid 4242)" in err and str(out / ".val.lock") in err
        assert not (out / "val.json").exists()
    assert run_cli(*args) == 0 and (out / "val.json").exists()


def test_flat_val_takes_class_names_from_train(tmp_path, capsys):
    photos = real_photos(48)[:4]
    src = tmp_path / "src"
    (src / "meta").mkdir(parents=True)
    train, val = [], []
    for k, (name, a) in enumerate(photos):
        wnid = f"n{k:08d}"
        for split, rel, lines in (("train", f"{wnid}/{name}.JPEG", train), ("val", f"val_{k:03d}.JPEG", val)):
            p = src / split / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(p, quality=90)
            lines.append(f"{rel} {k}")
    (src / "meta" / "train.txt").write_text("\n".join(train) + "\n")
    (src / "meta" / "val.txt").write_text("\n".join(val[:3]) + "\n")  # val lacks the last class
    for split in ("train", "val"):
        assert run_cli("create", "--src", src, "--split", split, "--out", tmp_path / "out", "--workers", 1,
                       "--no-progress") == 0
    man = {s: json.loads((tmp_path / "out" / f"{s}.json").read_text()) for s in ("train", "val")}
    assert man["val"]["classes"] == man["train"]["classes"] == [f"n{k:08d}" for k in range(4)]
    assert man["val"]["class_counts"] == [1, 1, 1, 0]
    # A val label train does not have, or a val folder naming another class, is an error naming it.
    (src / "meta" / "val.txt").write_text("\n".join(val) + "\nval_000.JPEG 7\n")
    capsys.readouterr()
    assert run_cli("create", "--src", src, "--split", "val", "--out", tmp_path / "o2", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "label 7" in err and "val.txt" in err and "4 classes" in err
    (src / "val" / "n00000001").mkdir()
    shutil.copy(src / "val" / "val_000.JPEG", src / "val" / "n00000001" / "x.JPEG")
    (src / "meta" / "val.txt").write_text("n00000001/x.JPEG 0\n")
    assert run_cli("create", "--src", src, "--split", "val", "--out", tmp_path / "o3", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "label 0 is folder 'n00000001' here but 'n00000000'" in err
