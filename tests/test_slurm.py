"""SLURM without SLURM: env parsing, a rendezvous that cannot complete, and 2 srun-style tasks
in a gloo group (the preemption path: test_slurm_requeue.py; the sbatch scripts: test_slurm_sbatch.py)."""
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import CHILD_WAIT_S, ROOT, SYNTHETIC, clean_env, wait_for_line

from common.distributed import slurm, world
from common.errors import UserError
from common.train.preempt import REQUEUE_EXIT_CODE

# 4 iterations per epoch; -j 0 and a fixed seed make runs bitwise repeatable
TINY = SYNTHETIC + ["--synthetic-size", "64", "-b", "16", "--moco-k", "32", "--moco-dim", "16",
                    "--mlp", "--aug-plus", "--bn-splits", "2", "--seed", "3", "-p", "1", "--schedule", "1", "--no-payoff"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def start(args, env, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "main_moco.py")] + args, cwd=ROOT, env=env,
                            text=True, **kw)


def signal_after_line(proc, line: str, sig):
    """Signal `proc` once it printed `line`; returns (stdout seen, exit code, stderr)."""
    try:
        seen = wait_for_line(proc, line)
        proc.send_signal(sig)
        seen += proc.stdout.read()
        return seen, proc.wait(timeout=CHILD_WAIT_S), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


# ---------------------------------------------------------------- env parsing

@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("gpu-a1,gpu-b2", ["gpu-a1", "gpu-b2"]),
    ("localhost", ["localhost"]),
    ("node7", ["node7"]),
    ("rack[1-2]-gpu[01-02]", ["rack1-gpu01", "rack1-gpu02", "rack2-gpu01", "rack2-gpu02"]),
    ("a[8-10],b[001-002],c", ["a8", "a9", "a10", "b001", "b002", "c"]),
    ("dgx-[3,5]x", ["dgx-3x", "dgx-5x"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert slurm.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["", "node[01-03", "node]01[", "node[a-c]", "node[[1]]"])
def test_bad_nodelist_is_a_user_error(nodelist):
    with pytest.raises(UserError, match="nodelist"):
        slurm.expand_nodelist(nodelist)


def _set_env(monkeypatch, **values):
    for k in list(os.environ):
        if k.startswith("SLURM_") or k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the parser decides
    for k, v in values.items():
        monkeypatch.setenv(k, str(v))


def test_slurm_env_reads_rank_world_master_and_port(monkeypatch):
    _set_env(monkeypatch, SLURM_PROCID=5, SLURM_NTASKS=8, SLURM_LOCALID=1, SLURM_JOB_ID=123456,
             SLURM_JOB_NODELIST="gpu[03-06]", SLURM_TASKS_PER_NODE="2(x4)", SLURM_NODEID=2)
    assert world.detect_launcher() == "slurm"
    s = slurm.slurm_env()
    assert s == {"rank": 5, "world_size": 8, "local_rank": 1, "init_method": "tcp://gpu03:18456"}
    assert slurm.slurm_tasks_on_this_node() == 2
    # the step's own values win over the job's (srun -N2 -n4 inside a bigger allocation)
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[05-06]")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "6")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "4,2")
    monkeypatch.setenv("SLURM_NODEID", "1")
    s = slurm.slurm_env()
    assert s["world_size"] == 6 and s["init_method"] == "tcp://gpu05:18456"
    assert slurm.slurm_tasks_on_this_node() == 2
    # explicit MASTER_ADDR/MASTER_PORT override; then the job id and nodelist are not needed
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    for k in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST"):
        monkeypatch.delenv(k)
    assert slurm.slurm_env()["init_method"] == "tcp://10.0.0.1:29999"


def test_single_task_or_torchrun_is_not_slurm(monkeypatch):
    _set_env(monkeypatch, SLURM_PROCID=0, SLURM_NTASKS=1, SLURM_LOCALID=0, SLURM_JOB_ID=1)
    assert world.detect_launcher() is None  # `srun -n1 python main_moco.py ...`: a plain run
    _set_env(monkeypatch, SLURM_PROCID=0, SLURM_NTASKS=4, RANK=0, WORLD_SIZE=2, LOCAL_RANK=0)
    assert world.detect_launcher() == "torchrun"  # torchrun inside an allocation


@pytest.mark.parametrize("values, missing", [
    (dict(SLURM_PROCID=0, SLURM_NTASKS=2, SLURM_JOB_ID=7, SLURM_JOB_NODELIST="n1"), "SLURM_LOCALID"),
    (dict(SLURM_PROCID=0, SLURM_NTASKS=2, SLURM_LOCALID=0, SLURM_JOB_NODELIST="n1"), "SLURM_JOB_ID"),
    (dict(SLURM_PROCID=0, SLURM_NTASKS=2, SLURM_LOCALID=0, SLURM_JOB_ID=7), "SLURM_JOB_NODELIST"),
    (dict(SLURM_PROCID="x", SLURM_NTASKS=2, SLURM_LOCALID=0, SLURM_JOB_ID=7, SLURM_JOB_NODELIST="n1"),
     "SLURM_PROCID='x' is not a number"),
    (dict(SLURM_PROCID=3, SLURM_NTASKS=2, SLURM_LOCALID=0, SLURM_JOB_ID=7, SLURM_JOB_NODELIST="n1"),
     "is not below SLURM_NTASKS 2"),
])
def test_missing_or_bad_slurm_variables_name_the_problem(monkeypatch, values, missing):
    _set_env(monkeypatch, **values)
    with pytest.raises(UserError, match=missing.replace("(", r"\(")) as e:
        slurm.slurm_env()
    assert "srun" in str(e.value)


@pytest.mark.slow
def test_missing_variable_is_one_sentence_from_the_script(tmp_path):
    env = clean_env(SLURM_PROCID=0, SLURM_NTASKS=2, SLURM_LOCALID=0, SLURM_JOB_NODELIST="localhost", PATH="/nonexistent")
    proc = subprocess.run([sys.executable, "main_moco.py"] + TINY + ["--epochs", "1", "--output-dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=CHILD_WAIT_S)
    assert proc.returncode == 2, proc.stderr
    assert "error: SLURM launch is missing SLURM_JOB_ID" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- a rendezvous that cannot complete

@pytest.mark.slow
def test_unresolvable_master_host_is_one_sentence_before_any_rendezvous(monkeypatch, tmp_path):
    _set_env(monkeypatch, SLURM_PROCID=1, SLURM_NTASKS=2, SLURM_LOCALID=1, SLURM_JOB_ID=7,
             SLURM_JOB_NODELIST="nosuchhost-xyz.invalid,node2")
    here = socket.gethostname()
    host = slurm.slurm_env()["init_method"][len("tcp://"):].rsplit(":", 1)[0]
    with pytest.raises(UserError) as e:
        slurm.check_master_resolves(host)
    assert str(e.value) == (
        f"the master host 'nosuchhost-xyz.invalid', the first host of SLURM_JOB_NODELIST='nosuchhost-xyz.invalid,node2', "
        f"does not resolve to an address on this node ({here}); set MASTER_ADDR to that node's IP address "
        f"(slurm/pretrain.sbatch shows how), or check the node list")
    monkeypatch.setenv("MASTER_ADDR", "nosuchhost-xyz.invalid")
    with pytest.raises(UserError, match=r"^MASTER_ADDR='nosuchhost-xyz.invalid' does not resolve to an address on "
                                        r"this node \(.*\); set MASTER_ADDR to the IP address of the node rank 0 runs on"):
        slurm.check_master_resolves("nosuchhost-xyz.invalid")
    slurm.check_master_resolves("localhost")

    # the script: one line, at once (not torch's 30-minute rendezvous retries)
    env = clean_env(SLURM_PROCID=1, SLURM_NTASKS=2, SLURM_LOCALID=1, SLURM_JOB_ID=7, PATH="/nonexistent",
                    SLURM_STEP_NODELIST="nosuchhost-xyz.invalid", SLURM_JOB_NODELIST="nosuchhost-xyz.invalid")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "main_moco.py"] + TINY + ["--epochs", "1", "--output-dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=CHILD_WAIT_S)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "main_moco.py: error: the master host 'nosuchhost-xyz.invalid', the first host of SLURM_STEP_NODELIST="), proc.stderr
    assert time.time() - t0 < 300  # against torch's 30 minutes of retries; a busy machine starts slowly


def listening(port: int) -> bool:
    """Whether some process listens on TCP `port` (from /proc/net: the test must not
    connect, which would count as a rank joining)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if os.path.exists(table):
            for line in open(table).read().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def one_of_two_srun_tasks(rank: int, tmp_path, **extra):
    """Task `rank` of a 2-task SLURM step whose other task never starts: (process, master port)."""
    job = _free_slurm_job_id()
    env = clean_env(SLURM_PROCID=rank, SLURM_LOCALID=rank, SLURM_NTASKS=2, SLURM_JOB_ID=job, SLURM_NODEID=0,
                    SLURM_JOB_NODELIST="localhost", SLURM_TASKS_PER_NODE="2", PATH="/nonexistent", **extra)
    proc = start(TINY + ["--epochs", "1", "--cpu", "--output-dir", str(tmp_path / f"out{rank}")], env,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return proc, 15000 + job % 20000


@pytest.mark.slow
def test_rendezvous_that_never_completes_gives_up_with_a_sentence(tmp_path):
    """The master never comes up (rank 1 alone), or a rank never joins (rank 0 alone): each
    ends after DIST_RENDEZVOUS_TIMEOUT with the address and the ranks, not after 30 minutes."""
    (client, port1), (master, port0) = (one_of_two_srun_tasks(r, tmp_path, DIST_RENDEZVOUS_TIMEOUT=2) for r in (1, 0))
    try:
        out1, err1 = client.communicate(timeout=CHILD_WAIT_S)
        out0, err0 = master.communicate(timeout=CHILD_WAIT_S)
    finally:
        for p in (client, master):
            if p.poll() is None:
                p.kill()
    assert client.returncode == 2 and "Traceback" not in err1, err1
    assert err1.strip().splitlines()[-1] == (
        f"main_moco.py: error: rank 1 of 2 could not reach the master (rank 0) at localhost:{port1} within 2 s; "
        f"check that rank 0 started and that localhost:{port1} is its address (MASTER_ADDR, the first host of the "
        f"SLURM node list, or --dist-url) and not blocked by a firewall, or raise DIST_RENDEZVOUS_TIMEOUT (seconds) "
        f"if the processes just start slowly"), err1
    assert master.returncode == 2 and "Traceback" not in err0, err0
    assert err0.strip().splitlines()[-1] == (
        f"main_moco.py: error: rank 0 waited 2 s at localhost:{port0} for the other 1 rank(s), but only 1 of the 2 "
        f"processes joined; check that every rank started (their logs say why one did not) and can reach "
        f"localhost:{port0}, or raise DIST_RENDEZVOUS_TIMEOUT (seconds) if the processes just start slowly"), err0


@pytest.mark.slow
def test_sigterm_during_the_rendezvous_ends_the_process_at_once(tmp_path):
    """Preemption signals are held until the loop can checkpoint, but SIGTERM is not held
    while the rendezvous blocks (in C++, where no Python handler runs): nothing is trained
    yet, and scancel must not wait for the rendezvous to give up."""
    proc, port = one_of_two_srun_tasks(0, tmp_path, DIST_RENDEZVOUS_TIMEOUT=300)
    try:
        t0 = time.time()
        while not listening(port):
            assert proc.poll() is None and time.time() - t0 < CHILD_WAIT_S, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        t1 = time.time()
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGTERM and time.time() - t1 < 10


# ---------------------------------------------------------------- 2 tasks, as srun starts them

def _free_slurm_job_id() -> int:
    """A job id whose derived port (15000 + id % 20000) is free right now."""
    for _ in range(200):
        job = random.randrange(1, 10 ** 6)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 15000 + job % 20000))
                return job
            except OSError:
                continue
    raise RuntimeError("no free port")


@pytest.mark.slow
def test_two_srun_tasks_train_and_agree_to_stop_on_one_ranks_signal(tmp_path):
    """Two processes with srun's variables form a gloo group (master from `scontrol show
    hostnames`, port from the job id) and train a full epoch; SIGUSR1 to rank 1 alone
    stops *both* at the same iteration; rank 0 checkpoints and calls `scontrol requeue`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls"
    (bin_dir / "scontrol").write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {calls}\n'
        'if [ "$1 $2" = "show hostnames" ]; then echo localhost; fi\n')
    (bin_dir / "scontrol").chmod(0o755)
    job = _free_slurm_job_id()
    out = tmp_path / "out"
    common = dict(SLURM_NTASKS=2, SLURM_JOB_ID=job, SLURM_JOB_NODELIST="localhost", SLURM_TASKS_PER_NODE="2",
                  SLURM_NODEID=0, PATH=f"{bin_dir}:/usr/bin:/bin")
    args = TINY + ["--epochs", "3", "--cpu", "--moco-k", "48", "--output-dir", str(out)]
    logs = [open(tmp_path / f"rank{r}.log", "w+") for r in (0, 1)]
    procs = [start(args, clean_env(SLURM_PROCID=r, SLURM_LOCALID=r, **common),
                   stdout=subprocess.PIPE if r == 0 else logs[r], stderr=logs[r]) for r in (0, 1)]
    try:
        seen = wait_for_line(procs[0], "epoch 0 done")
        procs[1].send_signal(signal.SIGUSR1)
        seen += procs[0].stdout.read()
        codes = [p.wait(timeout=CHILD_WAIT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    err = [open(tmp_path / f"rank{r}.log").read() for r in (0, 1)]
    assert codes == [REQUEUE_EXIT_CODE] * 2, (seen, err)
    assert "2 process(es)" in seen and "SIGUSR1 received" in err[1]
    assert f"requeued SLURM job {job}" in seen
    assert open(calls).read().split("\n")[:-1] == ["show hostnames localhost"] * 2 + [f"requeue {job}"]
    # one full epoch of 2-rank DDP; 4 steps x 16 keys through a queue of 48
    first = load(out / "checkpoint_0001.pth.tar")
    assert first["epoch"] == 1 and int(first["state_dict"]["module.queue_ptr"]) == 64 % 48
    mid = load(out / "checkpoint_last.pth.tar")
    assert mid["epoch"] == 1 and 1 <= mid["iteration"] <= 4, (mid["epoch"], mid["iteration"])
    assert f"(epoch 1, iteration {mid['iteration']})" in seen


@pytest.mark.slow
def test_sigterm_to_the_spawning_parent_reaches_its_workers(tmp_path):
    """`--multiprocessing-distributed`: `kill PARENT` is passed on to the spawned workers,
    which stop together, checkpoint and exit with the requeue code."""
    out = tmp_path / "out"
    args = TINY + ["--epochs", "3", "--cpu", "--moco-k", "48", "--output-dir", str(out), "--multiprocessing-distributed",
                   "--nproc-per-node", "2", "--dist-url", f"tcp://127.0.0.1:{15000 + _free_slurm_job_id() % 20000}"]
    proc = start(args, clean_env(PATH="/nonexistent"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen, code, err = signal_after_line(proc, "Epoch [0/3][2/4]", signal.SIGTERM)
    assert code == REQUEUE_EXIT_CODE, seen + err
    assert err.count("SIGUSR1 received") == 2 and "Traceback" not in err
    mid = load(out / "checkpoint_last.pth.tar")
    assert mid["epoch"] == 0 and 2 <= mid["iteration"] <= 4 and f"iteration {mid['iteration']})" in seen
