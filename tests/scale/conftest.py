"""Fixtures of the scale tests: the digits shards, made once with the real stm-shards tool."""
import subprocess

import pytest

from harness import launch_env, tool


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("digits")
    src, out = root / "src", root / "shards"
    shards = tool("stm-shards")
    for cmd in ([shards, "demo-source", "--out", str(src), "--size", "32"],
                [shards, "create", "--src", str(src), "--split", "train", "--out", str(out), "--no-progress"],
                [shards, "create", "--src", str(src), "--split", "val", "--out", str(out), "--no-progress"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=launch_env())
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return str(out)
