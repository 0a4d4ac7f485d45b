"""Shared fixture of the engine tests: the real digits data set as shards."""
import os
import sys

import pytest

# Test modules here import the launcher helpers as `engine_launch`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    """The real digits data set (1,497 train / 300 val, 32 px) as shards, written once."""
    from data_tools.demo_data import write_demo_source
    from data_tools.writer import create_shards

    root = tmp_path_factory.mktemp("digits")
    write_demo_source(str(root / "source"), size=32)
    for split in ("train", "val"):
        create_shards(str(root / "source"), split, str(root / "shards"), samples_per_shard=400, progress=False)
    return str(root / "shards")
