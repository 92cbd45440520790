"""One run per --output-dir (common/files/lock.py): a second run into a folder a live run
holds is refused and changes nothing; a lock left by a dead run is taken over with a
message; a requeued SLURM job takes over its own."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, SYNTHETIC, run_script

from common.errors import UserError
from common.files import lock


def write_lock(folder, **info) -> str:
    path = os.path.join(folder, lock.LOCK_NAME)
    base = {"pid": 1, "host": socket.gethostname(), "job": None, "started": time.time(), "command": "main_moco.py x"}
    with open(path, "w") as f:
        json.dump({**base, **info}, f)
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_holder_refuses_a_second_run_and_its_lock_is_kept(tmp_path):
    path = write_lock(tmp_path, pid=os.getppid())  # pytest's parent: alive for this test
    with pytest.raises(UserError, match=r"is in use by another run \(pid \d+ on .*main_moco.py x\); wait for it"):
        lock.acquire(str(tmp_path))
    assert json.load(open(path))["pid"] == os.getppid()


def test_a_dead_holder_on_this_host_is_taken_over_with_a_message(tmp_path, capsys):
    path = write_lock(tmp_path, pid=dead_pid())
    lock.acquire(str(tmp_path))
    said = capsys.readouterr().out
    assert "taking over the lock, its process (pid" in said and "is no longer running (killed or crashed)" in said
    assert json.load(open(path))["pid"] == os.getpid()
    lock.release(str(tmp_path))
    assert not os.path.exists(path)


def test_another_hosts_lock_is_stale_only_when_its_heartbeat_stopped(tmp_path, capsys):
    path = write_lock(tmp_path, pid=os.getpid() + 1, host="node-that-is-not-here")
    with pytest.raises(UserError, match="is in use by another run"):
        lock.acquire(str(tmp_path))
    old = time.time() - lock.STALE_S - 60
    os.utime(path, (old, old))
    lock.acquire(str(tmp_path))
    assert "has shown no sign of life for 6 minutes" in capsys.readouterr().out


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch, capsys):
    write_lock(tmp_path, pid=os.getppid(), host="other-node", job="4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lock.acquire(str(tmp_path))
    assert "this job's own (4242)" in capsys.readouterr().out


def test_an_empty_lock_from_a_kill_while_taking_it_is_taken_over(tmp_path, capsys):
    open(os.path.join(tmp_path, lock.LOCK_NAME), "w").close()
    lock.acquire(str(tmp_path))
    assert "empty or unreadable" in capsys.readouterr().out


def test_the_same_process_may_take_its_lock_again(tmp_path):
    lock.acquire(str(tmp_path))
    lock.acquire(str(tmp_path))
    lock.release()
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_two_runs_started_into_one_folder_the_second_is_refused_and_the_first_is_intact(tmp_path):
    out = tmp_path / "run"
    argv = SYNTHETIC + ["--synthetic-size", "64", "-b", "16", "--moco-k", "32", "--moco-dim", "16", "--bn-splits",
                        "2", "--seed", "3", "-p", "100", "--epochs", "3", "--output-dir", str(out)]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "main_moco.py")] + argv, cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # follow the first run's own progress, not a wall clock: its lock exists before its first step
        while not (out / lock.LOCK_NAME).exists():
            assert first.poll() is None, first.stdout.read()
            time.sleep(0.05)
        second = run_script("main_moco.py", argv, check=False)
        assert second.returncode == 2
        assert f"--output-dir {str(out)!r} is in use by another run (pid {first.pid} on" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        assert first.wait(timeout=900) == 0, first.stdout.read()
    finally:
        first.kill()
    epochs = [json.loads(line)["epoch"] for line in open(out / "metrics.jsonl")]
    assert epochs == [0, 1, 2]  # one run's epochs, not two interleaved
    assert not (out / lock.LOCK_NAME).exists()  # given back at the end
