"""SampleTable's column-wise index parser gives what the tars hold, and hands any other index
layout to the line-by-line parser."""
import os

import numpy as np
import pytest

from data_tools.tar_index import scan_tar
from stm_dist.data import epoch_plan
from stm_dist.data.epoch_plan import SampleTable
from stm_dist.data.manifest import ShardError


def _table(paths):
    return SampleTable([str(p)[:-4] + ".tar" for p in paths], [str(p) for p in paths])


def _truth(tars):
    """(jpg_off, jpg_size, cls_off, cls_size) per sample, read from the tars themselves."""
    rows = []
    for tar in tars:
        for entry in scan_tar(tar):
            m = {ext: (off, size) for ext, off, size, _ in entry}
            rows.append((*m["jpg"], *m["cls"]))
    return np.asarray(rows, np.int64).reshape(-1, 4)


def test_columns_match_the_tars_of_real_shards(digits_shards, monkeypatch):
    idxs = sorted(str(p) for p in digits_shards.glob("train-*.idx"))
    assert len(idxs) >= 2
    monkeypatch.setattr(epoch_plan, "_BATCH_FILES", 2)  # more than one batch, and a short last one
    t = _table(idxs)
    truth = _truth([p[:-4] + ".tar" for p in idxs])
    got = np.stack([t.jpg_off, t.jpg_size, t.cls_off, t.cls_size], 1)
    assert got.shape == truth.shape and (got == truth).all()
    assert (t.file == np.repeat(np.arange(len(idxs)), t.counts)).all() and sum(t.counts) == len(truth)
    # The fast path really ran on these (stm-shards' own layout).
    body = open(idxs[0], "rb").read().partition(b"\n")[2]
    assert epoch_plan._parse_two_member_body(body) is not None


def test_other_layouts_fall_back_to_the_line_parser(tmp_path):
    fast = tmp_path / "a.idx"
    fast.write_text("v1.2 2\ncls 512 1 k0.cls jpg 1536 10 k0.jpg\ncls 2560 2 k1.cls jpg 3584 300 k1.jpg\n")
    odd = tmp_path / "b.idx"  # jpg first, an extra member, a double space: another tool's index
    odd.write_text("v1.2 2\njpg 512 7 k2.jpg txt 1536 4 k2.txt cls 2560 1 k2.cls\n"
                   "jpg 3584 9 k3.jpg  cls 4608 3 k3.cls\n")
    empty = tmp_path / "c.idx"
    empty.write_text("v1.2 0\n")
    t = _table([fast, odd, empty])
    assert t.counts == [2, 2, 0]
    assert t.jpg_off.tolist() == [1536, 3584, 512, 3584] and t.jpg_size.tolist() == [10, 300, 7, 9]
    assert t.cls_off.tolist() == [512, 2560, 2560, 4608] and t.cls_size.tolist() == [1, 2, 1, 3]
    assert t.file.tolist() == [0, 0, 1, 1]
    for bad in (b"cls 5x2 1 k.cls jpg 1 1 k.jpg\n", b"cls 512 1 k.cls jpg 1536 10 k.jpg \n",
                b"txt 512 1 k.txt jpg 1536 10 k.jpg\n", b"cls 1 2 k.cls jpg 1 99999999999999999999 k.jpg\n"):
        assert epoch_plan._parse_two_member_body(bad) is None, bad


def test_a_sample_without_cls_is_named(tmp_path):
    idx = tmp_path / "d.idx"
    idx.write_text("v1.2 2\ncls 512 1 k0.cls jpg 1536 10 k0.jpg\njpg 2560 5 k1.jpg\n")
    with pytest.raises(ShardError, match=rf"{os.path.basename(idx)}:3: sample lacks a jpg or cls member"):
        _table([idx])
