"""A RandAugment DALI pipeline leaves nothing in the temporary folder, even in a process that
ends the way our ranks do (os._exit, no atexit hooks): DALI's conditionals write each function
they convert to a temp file and delete it only at interpreter exit."""
import os
import subprocess
import textwrap

from conftest import PY, subprocess_env

CHILD = textwrap.dedent("""
    import os, sys, tempfile
    from stm_dist.data import build_train_loader
    loader = build_train_loader(sys.argv[1], 8, img_size=32, num_threads=1, randaug=True)
    images, labels = next(iter(loader))
    assert images.shape == (8, 3, 32, 32), images.shape
    print("TMP", tempfile.gettempdir(), flush=True)
    os._exit(0)
""")


def test_randaug_pipeline_leaves_no_autograph_files(digits_shards, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    p = subprocess.run([PY, "-c", CHILD, str(digits_shards)], env=subprocess_env(TMPDIR=str(tmp)),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"TMP {tmp}" in p.stdout  # the child really used this folder
    assert not [f for f in os.listdir(tmp) if "autograph" in f], os.listdir(tmp)
