"""The PIL val loader keeps its workers across passes and still reads every sample exactly once
per pass, also after a pass left unfinished."""
from stm_dist.data import build_val_loader


def test_val_workers_persist_and_each_pass_is_exact_once(unique_shards):
    L = build_val_loader(unique_shards, 5, img_size=32, backend="pil", num_threads=2)
    first = next(iter(L))[1].tolist()  # a pass abandoned after one batch, with more in flight
    assert len(first) == 5
    passes, pids = [], []
    for _ in range(2):
        passes.append([y for _, ys in L for y in ys.tolist()])
        # torch's persistent-worker iterator: the same worker processes serve every pass.
        pids.append([w.pid for w in L._loader._iterator._workers])
    assert passes[0] == passes[1] and sorted(passes[0]) == list(range(24)), passes
    assert passes[0][:5] == first
    assert pids[0] == pids[1] and all(pids[0])
