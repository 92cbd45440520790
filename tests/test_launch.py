"""How the processes start and end (common/distributed/launch.py): a `--multiprocessing-distributed`
worker killed from outside (the out-of-memory killer's SIGKILL) ends the run with one
sentence naming the rank, the signal and how to continue."""
import os
import signal
import subprocess
import time

import pytest
from conftest import CHILD_WAIT_S, clean_env, wait_for_line
from test_slurm import TINY, _free_slurm_job_id, start


def spawned_workers(parent: int) -> list:
    """The parent's mp.spawn workers, oldest (local rank 0) first; multiprocessing's
    resource tracker is a child too, and is left out."""
    with open(f"/proc/{parent}/task/{parent}/children") as f:
        children = [int(pid) for pid in f.read().split()]
    workers = []
    for pid in children:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"spawn_main" not in f.read():
                continue
        with open(f"/proc/{pid}/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        workers.append((started, pid))
    return [pid for _, pid in sorted(workers)]


@pytest.mark.slow
def test_a_worker_killed_by_sigkill_names_its_rank_and_how_to_continue(tmp_path):
    out = tmp_path / "out"
    args = TINY + ["--epochs", "3", "--cpu", "--moco-k", "48", "--output-dir", str(out), "--save-every-iters", "1",
                   "--multiprocessing-distributed", "--nproc-per-node", "2",
                   "--dist-url", f"tcp://127.0.0.1:{15000 + _free_slurm_job_id() % 20000}"]
    proc = start(args, clean_env(PATH="/nonexistent"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_line(proc, "(epoch 0, iteration 1)")  # rank 0 saved after its first step
        workers = spawned_workers(proc.pid)
        assert len(workers) == 2, workers
        t0 = time.time()
        os.kill(workers[1], signal.SIGKILL)
        proc.stdout.read()
        code, err = proc.wait(timeout=CHILD_WAIT_S), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 128 + signal.SIGKILL, err
    assert time.time() - t0 < 20  # not torch's 30 s grace before SIGKILL
    last = out / "checkpoint_last.pth.tar"
    assert err.strip().splitlines()[-1] == (
        f"main_moco.py: error: worker rank 1 was killed by SIGKILL (often the out-of-memory killer: see `dmesg`, and "
        f"lower -b or -j if so), so the other workers were stopped; to continue, run the same command with "
        f"--resume auto, which resumes from {last}"), err
    # rank 0 is stopped, not told it will checkpoint
    assert "received: will checkpoint" not in err and "Traceback" not in err, err
