"""SLURM without SLURM: env parsing, a 2-task srun-style gloo run, the preemption signal
path (mid-epoch checkpoint, requeue exit code, exact resume) and the sbatch scripts."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import (CHILD_WAIT_S, ROOT, SYNTHETIC, assert_same_weights, clean_env, kill_after_line,
                      wait_for_line)

from common.distributed import collectives as cdist
from common.distributed import slurm, world
from common.errors import UserError
from common.train.preempt import REQUEUE_EXIT_CODE

# 4 iterations per epoch; -j 0 and a fixed seed make runs bitwise repeatable
TINY = SYNTHETIC + ["--synthetic-size", "64", "-b", "16", "--moco-k", "32", "--moco-dim", "16",
                    "--mlp", "--aug-plus", "--bn-splits", "2", "--seed", "3", "-p", "1", "--schedule", "1"]


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


# ---------------------------------------------------------------- the handler itself, in-process

def test_sigterm_sets_flag_then_the_run_checkpoints_and_exits_for_requeue(tmp_path, monkeypatch):
    """What the epoch loop does with a PretrainRun and its Checkpoints: --save-every-iters
    checkpoints when due, a signal only sets the stop flag, and the preemption path saves
    (epoch, iteration) and returns the requeue exit code."""
    import argparse

    from common.ckpt.checkpoints import Checkpoints
    from common.distributed.signals import PREEMPT_SIGNALS
    from common.train.data import PretrainData
    from common.train.run import PretrainRun
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = argparse.Namespace(arch="resnet18", output_dir=str(tmp_path), save_every_iters=4, knn_every=0,
                              resume=None, tensorboard=False, epochs=4, save_freq=1, keep_checkpoints=5, keep_epochs=[],
                              payoff=False)
    env = cdist.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)
    data = PretrainData(None, None, None, batch_size=2, iters_per_epoch=8, to_device=None)
    saved = {s: signal.getsignal(s) for s in PREEMPT_SIGNALS}
    try:
        checkpoints = Checkpoints(model, opt, None, args, "moco")
        run = PretrainRun(args, env, data, lambda e: 0.1, checkpoints.resume(), checkpoints)
        assert not run.save_due(1) and not run.stop.agreed()
        assert not os.path.exists(tmp_path / "checkpoint_last.pth.tar")
        assert run.save_due(4) and not run.save_due(8)  # --save-every-iters 4; 8 ends the epoch
        run.save_mid_epoch(3, 4)
        assert (load(tmp_path / "checkpoint_last.pth.tar")["iteration"]) == 4
        os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets the flag
        assert run.stop.requested == "SIGTERM" and run.stop.agreed()
        checkpoints.save_mid_epoch(3, 5)  # the scripts' preemption path
        assert run.stop.requeue() == REQUEUE_EXIT_CODE
        ckpt = load(tmp_path / "checkpoint_last.pth.tar")
        assert (ckpt["epoch"], ckpt["iteration"], ckpt["method"]) == (3, 5, "moco")
        torch.testing.assert_close(ckpt["state_dict"]["module.weight"], model.weight)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


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


# ---------------------------------------------------------------- signal path, exact resume

@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 2-epoch run: the reference the interrupted runs must reproduce."""
    out = tmp_path_factory.mktemp("straight")
    subprocess.run([sys.executable, "main_moco.py"] + TINY + ["--epochs", "2", "--output-dir", str(out)],
                   cwd=ROOT, env=clean_env(), check=True, capture_output=True, timeout=CHILD_WAIT_S)
    return out / "checkpoint_last.pth.tar"


@pytest.mark.slow
def test_sigusr1_checkpoints_mid_epoch_exits_for_requeue_and_resumes_exactly(tmp_path, straight):
    out = tmp_path / "out"
    args = TINY + ["--epochs", "2", "--output-dir", str(out), "--resume", "auto"]
    # PATH without scontrol: the requeue is logged, not a crash
    env = clean_env(SLURM_JOB_ID=4242, PATH="/nonexistent")
    proc = start(args, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen, code, err = signal_after_line(proc, "Epoch [0/2][2/4]", signal.SIGUSR1)
    assert code == REQUEUE_EXIT_CODE, seen + err
    assert "SIGUSR1 received" in err and "Traceback" not in err
    assert "scontrol not found: cannot requeue SLURM job 4242" in seen
    mid = load(out / "checkpoint_last.pth.tar")
    # the epoch is not over: the checkpoint says where inside it we stopped
    assert (mid["epoch"], mid["method"]) == (0, "moco") and 2 <= mid["iteration"] <= 4, (mid["epoch"], mid["iteration"])
    assert not os.path.exists(out / "checkpoint_0001.pth.tar")

    # the requeued job runs the very same command
    resumed = subprocess.run([sys.executable, "main_moco.py"] + args, cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=CHILD_WAIT_S)
    assert resumed.returncode == 0, resumed.stderr
    assert f"iteration {mid['iteration']}" in resumed.stdout
    # training continues at the next iteration: nothing repeated, nothing skipped
    assert f"Epoch [0/2][{mid['iteration']}/4]" not in resumed.stdout
    assert mid["iteration"] == 4 or f"Epoch [0/2][{mid['iteration'] + 1}/4]" in resumed.stdout
    assert_same_weights(straight, out / "checkpoint_last.pth.tar")


@pytest.mark.slow
def test_sigusr1_and_resume_without_seed_keep_the_runs_own_seed(tmp_path):
    """slurm/pretrain.sbatch passes no --seed: the interrupted run's seed must come back."""
    no_seed = TINY[:TINY.index("--seed")] + TINY[TINY.index("--seed") + 2:]
    out = tmp_path / "out"
    args = no_seed + ["--epochs", "2", "--output-dir", str(out), "--resume", "auto"]
    env = clean_env(PATH=os.environ["PATH"])
    proc = start(args, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen, code, err = signal_after_line(proc, "Epoch [0/2][2/4]", signal.SIGUSR1)
    assert code == REQUEUE_EXIT_CODE, seen + err
    seed = load(out / "checkpoint_last.pth.tar")["args"]["seed"]
    resumed = subprocess.run([sys.executable, "main_moco.py"] + args, cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=CHILD_WAIT_S)
    assert resumed.returncode == 0, resumed.stderr
    assert load(out / "checkpoint_last.pth.tar")["args"]["seed"] == seed
    first = json.loads(open(out / "metrics.jsonl").readline())
    assert first["epoch"] == 0 and first["resumed_at_iteration"] >= 2  # its averages cover the rest of the epoch
    # bitwise the uninterrupted run of that seed
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "main_moco.py"] + no_seed + ["--seed", str(seed), "--epochs", "2", "--output-dir",
                   str(ref)], cwd=ROOT, env=env, check=True, capture_output=True, timeout=CHILD_WAIT_S)
    assert_same_weights(ref / "checkpoint_last.pth.tar", out / "checkpoint_last.pth.tar")


@pytest.mark.slow
def test_signal_before_the_first_step_still_checkpoints_and_requeues(tmp_path):
    out = tmp_path / "out"
    proc = start(TINY + ["--epochs", "1", "--output-dir", str(out)], clean_env(PATH=os.environ["PATH"]),
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # "N images, M iterations/epoch" is printed once the data is built, before the model is
    seen, code, err = signal_after_line(proc, "iterations/epoch", signal.SIGUSR1)
    assert code == REQUEUE_EXIT_CODE, seen + err
    ckpt = load(out / "checkpoint_last.pth.tar")
    assert (ckpt["epoch"], ckpt["iteration"]) == (0, 1)


@pytest.mark.slow
def test_killed_job_resumes_from_save_every_iters_checkpoint(tmp_path, straight):
    """A hard kill (no signal handler runs) loses at most --save-every-iters iterations;
    resuming from that checkpoint still reproduces the uninterrupted run."""
    out = tmp_path / "out"
    args = TINY + ["--epochs", "2", "--output-dir", str(out), "--resume", "auto", "--save-every-iters", "3"]
    proc = start(args, clean_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    kill_after_line(proc, "(epoch 1, iteration 3)")
    mid = load(out / "checkpoint_last.pth.tar")
    assert (mid["epoch"], mid["iteration"]) == (1, 3)
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]
    resumed = subprocess.run([sys.executable, "main_moco.py"] + args, cwd=ROOT, env=clean_env(),
                             capture_output=True, text=True, timeout=CHILD_WAIT_S)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "Epoch [1/2][4/4]" in resumed.stdout
    assert_same_weights(straight, out / "checkpoint_last.pth.tar")


# ---------------------------------------------------------------- sbatch scripts

SBATCH = ["pretrain.sbatch", "lincls.sbatch"]


@pytest.mark.parametrize("name", SBATCH)
def test_sbatch_syntax_and_headers(name):
    path = os.path.join(ROOT, "slurm", name)
    subprocess.run(["bash", "-n", path], check=True)
    text = open(path).read()
    headers = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in headers and "#SBATCH --open-mode=append" in headers
    if name == "pretrain.sbatch":
        assert "#SBATCH --signal=USR1@120" in headers
    # exactly one srun line, always resuming
    sruns = [line for line in text.splitlines() if line.startswith("srun ")]
    assert len(sruns) == 1 and "--resume auto" in sruns[0]


def _dry_run(tmp_path, script, **env_extra):
    """Run the sbatch file with `srun` and `scontrol` stubs that print instead of running."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool}-stub $*"\n')
        (bin_dir / tool).chmod(0o755)
    env = clean_env(PATH=f"{bin_dir}:/usr/bin:/bin", SLURM_JOB_ID=777, SLURM_SUBMIT_DIR=ROOT,
                    SLURM_CPUS_PER_TASK=6, SLURM_NTASKS_PER_NODE=4, SLURM_JOB_NODELIST="node[1-2]", **env_extra)
    return subprocess.run(["bash", os.path.join(ROOT, "slurm", script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)


def test_pretrain_sbatch_dry_run_prints_the_command(tmp_path):
    proc = _dry_run(tmp_path, "pretrain.sbatch", DATA="/data/in1k", EPOCHS=800, BATCH_SIZE=1024, ARCH="resnet18",
                    EXTRA_ARGS="--amp --save-every-iters 500")
    assert proc.returncode == 0, proc.stderr
    line = [x for x in proc.stdout.splitlines() if x.startswith("srun-stub")][0].split()
    assert line[line.index("--kill-on-bad-exit=1") + 2] == "main_moco.py"
    cmd = " ".join(line)
    for part in ("main_moco.py /data/in1k -a resnet18 --epochs 800 -b 1024 -j 24 --output-dir runs/moco_777",
                 "--resume auto", "--mlp --moco-t 0.2 --aug-plus --cos", "--amp --save-every-iters 500"):
        assert part in cmd, cmd
    assert "restart 0 on node[1-2]" in proc.stdout

    proc = _dry_run(tmp_path, "pretrain.sbatch", METHOD="simclr", OUTPUT_DIR="runs/keep")
    if os.path.exists(os.path.join(ROOT, "main_simclr.py")):
        assert proc.returncode == 0, proc.stderr
        assert "main_simclr.py /path/to/imagenet -a resnet50" in proc.stdout and "--output-dir runs/keep" in proc.stdout
    else:
        assert proc.returncode == 2 and "main_simclr.py not found" in proc.stderr

    proc = _dry_run(tmp_path, "pretrain.sbatch", METHOD="byol")
    assert proc.returncode == 2 and "METHOD=byol is not moco or simclr" in proc.stderr


def test_lincls_sbatch_dry_run_needs_pretrained(tmp_path):
    proc = _dry_run(tmp_path, "lincls.sbatch")
    assert proc.returncode == 2 and "PRETRAINED is not set" in proc.stderr
    proc = _dry_run(tmp_path, "lincls.sbatch", PRETRAINED="runs/moco_777/checkpoint_0200.pth.tar", DATA="/d",
                    LINCLS_ARGS="--finetune --label-fraction 0.1")
    if os.path.exists(os.path.join(ROOT, "main_lincls.py")):
        assert proc.returncode == 0, proc.stderr
        cmd = [x for x in proc.stdout.splitlines() if x.startswith("srun-stub")][0]
        for part in ("main_lincls.py /d -a resnet50 --epochs 100 -b 256 -j 24",
                     "--pretrained runs/moco_777/checkpoint_0200.pth.tar", "--resume auto", "--finetune --label-fraction 0.1"):
            assert part in cmd, cmd
    else:
        assert proc.returncode == 2 and "main_lincls.py not found" in proc.stderr
