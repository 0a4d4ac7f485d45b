"""The worker side of `stm-shards create`: one task = one whole shard, and the processes that run them.

A worker reads, validates, writes, hashes and indexes its shard; the parent only receives the
small per-shard record, so image bytes never travel to (and pile up in) the parent: each worker
holds one image at a time whatever the output disk's speed.

The durable part of a shard (fsync of the tar, index, rename, commit record) is disk waiting, not
CPU, so each worker hands it to a thread and goes on validating its next shard meanwhile. At
most two commits are in flight per worker, so memory stays bounded; a task's result is sent only
once its record is on disk, so the parent never counts a shard that is not committed. Near the
end of the run, idle workers help busy ones (data_tools/tail_help.py).
"""
from __future__ import annotations

import json
import os
import queue
import re
import signal
import threading
import time

from data_tools.coco_src import fit_to_annotations
from data_tools.image_check import BadImage, check_image
from data_tools.tail_help import OWNER_CHECKS, PASSES, TailBoard, help_until_done
from data_tools.tar_index import HashingFd, ShardWriter


class CreateError(RuntimeError):
    """A fatal problem with the run; the message names the file or setting at fault."""


def sample_key(position: int, rel: str) -> str:
    # The position keeps keys unique and sortable; the source stem helps a human trace a sample.
    stem = os.path.basename(rel).split(".", 1)[0]
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", stem)[:40]
    return f"{position:08d}_{stem}" if stem else f"{position:08d}"


def _read(path: str):
    """(bytes, stamp): os.read of the known size, one allocation and no buffered-file objects per
    image; the stamp (size, mtime_ns, inode) says whether the file changed between two reads."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        # Masked to fit the board's int64 slots: some file systems hand out 64-bit inode numbers.
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino & 0x7FFF_FFFF_FFFF_FFFF)
        data = os.read(fd, st.st_size + 1)
        if len(data) == st.st_size:  # less than asked of a regular file: that was its end
            return data, stamp
        chunks = [data]  # changed since fstat (or not a regular file): read to the end
        while chunks[-1]:
            chunks.append(os.read(fd, 1 << 20))
        return b"".join(chunks), None
    finally:
        os.close(fd)


def _process(path: str, passed=None):
    """Read and validate one file. Returns ("ok", bytes, conversion) or ("skip", reason).

    ``passed``: the stamp under which a helper found this file usable as-is; if the file still
    has it, the decode is not repeated."""
    try:
        data, stamp = _read(path)
    except FileNotFoundError:
        return ("skip", "missing file")
    except OSError as e:
        return ("skip", f"unreadable: {e.strerror or e}")
    if passed is not None and stamp == passed:
        return ("ok", data, None)
    try:
        jpeg, conversion, _ = check_image(data)
    except BadImage as e:
        return ("skip", str(e))
    return ("ok", jpeg, conversion)


def _fit_detection(res, label):
    """A detection sample's image must also agree with its annotations (size, orientation)."""
    try:
        data, fitted = fit_to_annotations(res[1], label)
    except BadImage as e:
        return ("skip", str(e))
    return ("ok", data, res[2] or fitted)


def _validate_for_owner(path: str):
    """A helper's verdict on one file (see tail_help): (PASSES, stamp) or (OWNER_CHECKS, zeros)."""
    try:
        data, stamp = _read(path)
        if stamp is not None and check_image(data)[1] is None:
            return PASSES, stamp
    except Exception:  # whatever went wrong, the owner meets it again in its own check
        pass
    return OWNER_CHECKS, (0, 0, 0)


def remove(path: str):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _write_synced(path: str, data: bytes, errors: list | None = None):
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if errors is None:
            raise
        errors.append(e)


def write_atomic(path: str, data: bytes):
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    _write_synced(tmp, data)
    os.replace(tmp, path)


def write_json_atomic(path: str, obj):
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _write_data(task, board=None, slot=0, task_no=0):
    """Read, validate, write and hash one shard's samples into its temp tar (not yet durable).

    A task is (index, name, out, progress dir, items, strict, die_halfway[, kind]); items are
    (position, rel, label, path). kind "cls" (the default): label is the class index, written
    as ``.cls``; "det": label is a coco_src.DetLabel, written as ``.json``.

    Returns ("commit", commit_fn), ("error", message) or ("die",)."""
    i, name, out, prog, items, strict, die_halfway = task[:7]
    if board is not None:
        board.publish(slot, task_no, len(items))
    try:
        return _write_samples(task, board, slot)
    finally:
        if board is not None:
            board.withdraw(slot)


def _write_samples(task, board, slot):
    i, name, out, prog, items, strict, die_halfway = task[:7]
    det = task[7:] == ("det",)
    tar_path = os.path.join(out, f"{name}.tar")
    tmp_tar = os.path.join(out, f".{name}.tar.tmp")
    rec = {"index": i, "name": f"{name}.tar", "samples": 0, "bytes": 0, "sha256": None,
           "skipped": [], "reencoded": {}, "class_counts": {}}
    fd = -1
    try:
        fd = os.open(tmp_tar, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        sink = HashingFd(fd)
        w = ShardWriter(sink)
        reencoded, class_counts, skipped = rec["reencoded"], rec["class_counts"], rec["skipped"]
        for k, (pos, rel, label, path) in enumerate(items):
            if die_halfway and k == len(items) // 2:
                os.close(fd)
                return ("die",)
            if board is None or board.take(slot, k):
                res = _process(path)
            else:  # a helper validated it (tail_help)
                verdict, stamp = board.verdict_of(slot, k)
                res = _process(path, stamp if verdict == PASSES else None)
            if det and res[0] == "ok":
                res = _fit_detection(res, label)
            if res[0] == "skip":
                if strict:
                    raise CreateError(f"{path}: {res[1]} (--strict)")
                skipped.append({"path": rel, "reason": res[1]})
                continue
            _, data, conversion = res
            if conversion:
                reencoded[conversion] = reencoded.get(conversion, 0) + 1
            if det:
                for c, count in label.class_counts:  # annotations per category index
                    class_counts[c] = class_counts.get(c, 0) + count
                members = [("jpg", data), ("json", label.json)]
            else:
                lab = str(label)
                class_counts[lab] = class_counts.get(lab, 0) + 1
                members = [("cls", lab.encode()), ("jpg", data)]
            w.add_sample(sample_key(pos, rel), members)
        rec["samples"] = len(w.samples)
        if w.samples:
            w.finish()
            rec["sha256"], rec["bytes"] = sink.sha256.hexdigest(), sink.bytes
    except CreateError as e:
        _close_quietly(fd)
        remove(tmp_tar)
        return ("error", str(e))
    except OSError as e:  # disk full, permissions: name the file, keep what is committed
        _close_quietly(fd)
        remove(tmp_tar)
        return ("error", f"{tmp_tar}: {e.strerror or e}")
    index = w.index_text().encode() if w.samples else b""

    def commit():
        idx_tmp = os.path.join(out, f".{name}.idx.tmp")
        try:
            if rec["samples"]:
                # The tar and its index must both be durable before the renames; their fsyncs run
                # side by side (one journal commit can serve both), not one after the other.
                idx_error = []
                t = threading.Thread(target=_write_synced, args=(idx_tmp, index, idx_error))
                t.start()
                os.fsync(fd)
                t.join()
                if idx_error:
                    raise idx_error[0]
                os.close(fd)
                os.replace(idx_tmp, os.path.join(out, f"{name}.idx"))
                os.replace(tmp_tar, tar_path)
            else:  # every input of this slice was bad: no file at all beats an empty tar
                os.close(fd)
                os.remove(tmp_tar)
            # The record is the commit: written only once the tar and index are in place.
            write_json_atomic(os.path.join(prog, f"{i:06d}.json"), rec)
            return ("ok", rec)
        except OSError as e:
            _close_quietly(fd)
            remove(tmp_tar)
            remove(idx_tmp)
            return ("error", f"{e.filename or tmp_tar}: {e.strerror or e}")

    return ("commit", commit)


def _close_quietly(fd: int):
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


_MAX_COMMITS = 2


def _worker_main(slot, tasks, board, todo, results):
    # Ctrl-C reaches the whole process group; the parent handles it (terminates us, removes the
    # temp files), so a worker's traceback would only be noise.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    committing: list[threading.Thread] = []
    for task_no in iter(todo.get, None):
        res = _write_data(tasks[task_no], board, slot, task_no)
        if res[0] == "commit":
            # Shards commit independently, so a slow fsync of the previous one need not hold this
            # one back; two in flight at most keeps open files and index texts bounded.
            while len(committing) >= _MAX_COMMITS:
                committing.pop(0).join()
            t = threading.Thread(target=lambda c=res[1]: results.put(c()))
            t.start()
            committing.append(t)
        else:
            for t in committing:
                t.join()
            committing = []
            results.put(res)
    if board is not None:
        help_until_done(board, tasks, _validate_for_owner)
    for t in committing:
        t.join()


def run_tasks(ctx, tasks: list, processes: int):
    """Yield one result per task, in finishing order, from ``processes`` worker processes.

    Results: ("ok", record), ("error", message) or ("die",). On any exception in the caller
    (including GeneratorExit) the workers are terminated before this returns."""
    if processes == 1:
        yield from _run_in_process(tasks)
        return
    tq, rq = ctx.Queue(), ctx.Queue()
    # Forked workers inherit the task list and the shared board; under spawn they would get a
    # pickled copy each and no board (no tail help).
    board = TailBoard(ctx, processes, max(len(t[4]) for t in tasks)) if ctx.get_start_method() == "fork" else None
    procs = [ctx.Process(target=_worker_main, args=(s, tasks, board, tq, rq), daemon=True) for s in range(processes)]
    try:
        for p in procs:
            p.start()
        for k in range(len(tasks)):
            tq.put(k)
        for _ in procs:
            tq.put(None)
        for _ in range(len(tasks)):
            yield _next_result(rq, procs)
        for p in procs:
            p.join()
        procs = []
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join()
        tq.cancel_join_thread()  # unsent tasks of a failed run must not block our exit


class _Commit(threading.Thread):
    def __init__(self, fn):
        super().__init__()
        self.fn, self._result, self._error = fn, None, None
        self.start()

    def run(self):
        try:
            self._result = self.fn()
        except BaseException as e:  # a bug, not a disk error (those are results): raise it in the caller
            self._error = e

    @property
    def result(self):
        if self._error is not None:
            raise self._error
        return self._result


def _run_in_process(tasks):
    """One worker: no process to start (library callers keep their process to themselves), and
    the commit of one shard still overlaps the writing of the next."""
    pending = None
    try:
        for task in tasks:
            res = _write_data(task)
            if pending is not None:
                pending.join()
                done, pending = pending.result, None
                yield done
            if res[0] == "commit":
                pending = _Commit(res[1])
            else:
                yield res
        if pending is not None:
            pending.join()
            done, pending = pending.result, None
            yield done
    finally:
        if pending is not None:  # stopped early: let the running commit finish, not tear it
            pending.join()


def _next_result(rq, procs):
    idle_since = None
    while True:
        try:
            return rq.get(timeout=0.5)
        except queue.Empty:
            pass
        dead = [p for p in procs if p.exitcode not in (None, 0)]
        if dead:
            p = dead[0]
            how = (f"was killed by signal {-p.exitcode} (out of memory?)" if p.exitcode < 0
                   else f"failed with exit code {p.exitcode} (its error is above)")
            raise CreateError(f"a shard worker (pid {p.pid}) {how}; committed shards are kept: "
                              f"rerun the same command to finish")
        if all(p.exitcode == 0 for p in procs):
            # All exited cleanly: their last results may still be in the pipe; wait a moment.
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > 5:
                raise CreateError("the shard workers exited without reporting every shard; "
                                  "rerun the same command to finish")
