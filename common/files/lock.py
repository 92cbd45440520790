"""One run per output folder: `run.lock` in --output-dir, created atomically by the run's first
process and removed when it ends. A second run into the same folder (a double submit, a rerun
while the first still trains) is refused with one sentence naming the holder, instead of both
writing checkpoints and metrics into one folder. A lock left by a run that died (kill -9, a
crash, a node lost) is recognised and taken over with a message: on this host its process is
gone; from another host its heartbeat (the file's mtime, touched every HEARTBEAT_S) stopped.
A requeued SLURM job (same SLURM_JOB_ID) takes over its own earlier lock."""
import atexit
import json
import os
import socket
import sys
import threading
import time
from typing import Dict, Optional

from common.errors import UserError

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
# a lock whose heartbeat is this old belongs to a run that is gone (ten missed beats)
STALE_S = 10 * HEARTBEAT_S

_held: Dict[str, threading.Event] = {}  # lock path -> its heartbeat's stop event


def _job_id() -> Optional[str]:
    """The scheduler's id of this run: equal across its processes and a SLURM requeue."""
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or None


def _read(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # half-written by a run killed while creating it
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(info: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {started}: {info.get('command', '?')}"


def _why_stale(info: dict, path: str) -> Optional[str]:
    """Why the holder recorded in `info` is gone, or None while it may still run."""
    if not info:
        return "it is empty or unreadable (its run was killed while taking it)"
    if _job_id() and info.get("job") == _job_id():
        return f"it is this job's own ({info.get('job')}), left by its run before a requeue"
    try:
        age = time.time() - os.path.getmtime(path)
    except FileNotFoundError:
        return "it is gone"
    if info.get("host") == socket.gethostname():
        if info.get("pid") == os.getpid():
            return None
        if not _alive(int(info.get("pid", -1))):
            return f"its process ({_describe(info)}) is no longer running (killed or crashed)"
    if age > STALE_S:
        return f"its run ({_describe(info)}) has shown no sign of life for {age / 60:.0f} minutes"
    return None


def acquire(output_dir: str) -> None:
    """Take `output_dir`'s run lock for this process, or refuse with one sentence. Holding it
    already (the same process calling again) is fine. Released by `release` or at exit."""
    path = os.path.join(output_dir, LOCK_NAME)
    if path in _held:
        return
    info = {"pid": os.getpid(), "host": socket.gethostname(), "job": _job_id(), "started": time.time(),
            "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:300]}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            other = _read(path)
            if other is None:  # removed meanwhile: try again
                continue
            if other.get("pid") == os.getpid() and other.get("host") == info["host"]:
                break  # ours, taken by an earlier call in this process
            why = _why_stale(other, path)
            if why is None:
                raise UserError(f"--output-dir {output_dir!r} is in use by another run ({_describe(other)}); wait "
                                f"for it to end or pass another --output-dir (if that run is gone, delete {path})")
            print(f"=> {path}: taking over the lock, {why}", flush=True)
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        break
    else:
        raise UserError(f"--output-dir {output_dir!r} was just taken by another run ({_describe(_read(path) or {})}); "
                        f"pass another --output-dir")
    stop = threading.Event()
    _held[path] = stop
    threading.Thread(target=_heartbeat, args=(path, stop), daemon=True, name="run-lock-heartbeat").start()


def _heartbeat(path: str, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            os.utime(path)
        except OSError:  # the folder went away or became read-only: nothing left to guard
            return


def release(output_dir: Optional[str] = None) -> None:
    """Remove the lock(s) this process holds (every one when `output_dir` is None)."""
    for path in [p for p in _held if output_dir is None or p == os.path.join(output_dir, LOCK_NAME)]:
        _held.pop(path).set()
        info = _read(path)
        if info and info.get("pid") == os.getpid():  # never a successor's lock
            try:
                os.remove(path)
            except OSError:
                pass


atexit.register(release)
