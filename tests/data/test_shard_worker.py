"""The shard worker's fast paths keep shard bytes exact: the raw-fd tar writer against tarfile,
and idle workers validating the tail of a busy worker's shard (tail_help)."""
import hashlib
import io
import multiprocessing as mp
import os
import sys
import tarfile
import threading
import time

import pytest

from data_tools import shard_worker as sw
from data_tools.tail_help import PASSES, TailBoard, help_until_done
from data_tools.tar_index import HashingFd, ShardWriter
from tests.data.test_shard_tool import _bad_source

fork_only = pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="the board is shared through fork")


def test_shard_writer_bytes_match_tarfile(tmp_path):
    samples = [(f"{i:08d}_k", [("cls", str(i).encode()), ("jpg", bytes([i % 251]) * size)])
               for i, size in enumerate([0, 1, 511, 512, 513, 5000, 70_000])]
    path = tmp_path / "ours.tar"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sink = HashingFd(fd, writeback_every=1024)  # the writeback hint fires many times: no effect on bytes
    w = ShardWriter(sink)
    for key, members in samples:
        w.add_sample(key, members)
    size = w.finish()
    os.close(fd)

    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for key, members in samples:
            for ext, data in members:
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(data), 0, 0o644, 0, 0, "", ""
                tf.addfile(ti, io.BytesIO(data))
    ours = path.read_bytes()
    assert ours == ref.getvalue()
    assert size == sink.bytes == len(ours) and sink.sha256.hexdigest() == hashlib.sha256(ours).hexdigest()


def _task(src, out, name):
    paths = sorted(str(p) for p in (src / "train").rglob("*.JPEG"))
    items = [(k, os.path.relpath(p, src / "train"), k % 3, p) for k, p in enumerate(paths)]
    items.append((len(items), "bad/missing.JPEG", 1, str(src / "train" / "bad" / "missing.JPEG")))
    os.makedirs(out / "prog", exist_ok=True)
    return (0, name, str(out), str(out / "prog"), items, False, False)


def _write(task, board=None):
    res = sw._write_data(task, board, 0, 0)
    assert res[0] == "commit", res
    return res[1]()


@fork_only
def test_tail_help_leaves_shard_bytes_and_record_unchanged(tmp_path, monkeypatch):
    _bad_source(tmp_path / "src")
    task_ref = _task(tmp_path / "src", tmp_path / "ref", "train-000000")
    ok, ref_rec = _write(task_ref)
    assert ok == "ok" and ref_rec["skipped"] and ref_rec["reencoded"]  # the mix of cases is there

    owner = threading.main_thread()
    decoded = {"owner": 0, "helper": 0}
    real_check = sw.check_image

    def check(data):  # the owner is slow, so the helper gets most of the shard from the back
        if threading.current_thread() is owner:
            decoded["owner"] += 1
            time.sleep(0.03)
        else:
            decoded["helper"] += 1
        return real_check(data)

    monkeypatch.setattr(sw, "check_image", check)
    task = _task(tmp_path / "src", tmp_path / "out", "train-000000")
    board = TailBoard(mp.get_context("fork"), 2, len(task[4]))
    helper = threading.Thread(target=help_until_done, args=(board, [task], sw._validate_for_owner))
    helper.start()
    ok, rec = _write(task, board)
    helper.join(timeout=30)
    assert not helper.is_alive() and ok == "ok"
    assert rec == ref_rec
    assert (tmp_path / "out" / "train-000000.tar").read_bytes() == (tmp_path / "ref" / "train-000000.tar").read_bytes()
    assert (tmp_path / "out" / "train-000000.idx").read_bytes() == (tmp_path / "ref" / "train-000000.idx").read_bytes()
    # The helper really took work off the owner: passing files it validated are not decoded again.
    n_files = len(task[4]) - 1  # the missing one is never decoded
    assert decoded["helper"] >= 3 and decoded["owner"] < n_files, decoded


def test_a_helpers_verdict_holds_only_for_the_file_it_saw(tmp_path, monkeypatch):
    _bad_source(tmp_path / "src")
    good = next((tmp_path / "src" / "train" / "good").glob("*.JPEG"))
    verdict, stamp = sw._validate_for_owner(str(good))
    assert verdict == PASSES
    bad = tmp_path / "src" / "train" / "bad" / "truncated.JPEG"
    assert sw._validate_for_owner(str(bad))[0] != PASSES

    def no_decode(data):
        raise AssertionError("a file that passed under this stamp was decoded again")

    monkeypatch.setattr(sw, "check_image", no_decode)
    assert sw._process(str(good), stamp) == ("ok", good.read_bytes(), None)
    monkeypatch.undo()
    # Replaced since the helper looked (truncated): the stamp differs, so the owner checks it.
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    res = sw._process(str(good), stamp)
    assert res[0] == "skip" and "truncated" in res[1]


@fork_only
@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL of a forked worker")
def test_a_killed_worker_stops_the_run_with_one_clear_error(tmp_path, monkeypatch):
    import signal

    from data_tools.writer import CreateError, create_shards

    _bad_source(tmp_path / "src")
    real = sw._write_data

    def killed_on_second_shard(task, *a):
        if task[0] == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(task, *a)

    monkeypatch.setattr(sw, "_write_data", killed_on_second_shard)  # fork: the workers inherit it
    with pytest.raises(CreateError, match=r"killed by signal 9.*rerun the same command"):
        create_shards(str(tmp_path / "src"), "train", str(tmp_path / "out"), samples_per_shard=3, workers=2,
                      progress=False)
    assert not list((tmp_path / "out").glob(".*.tar.tmp"))


def test_an_unusable_output_folder_is_one_error_line(tmp_path, capsys):
    from tests.data.conftest import run_cli

    _bad_source(tmp_path / "src")
    (tmp_path / "afile").write_text("not a folder")
    out = tmp_path / "afile" / "shards"
    assert run_cli("create", "--src", tmp_path / "src", "--split", "train", "--out", out, "--no-progress") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "writable --out" in err[0], err
