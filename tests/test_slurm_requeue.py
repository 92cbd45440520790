"""Preemption: the signal handler in-process, then SIGUSR1/SIGTERM to a run: a mid-epoch
checkpoint, the requeue exit code and a resume that reproduces the uninterrupted run."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import CHILD_WAIT_S, ROOT, assert_same_weights, clean_env, kill_after_line
from test_slurm import TINY, load, signal_after_line, start

from common.distributed import collectives as cdist
from common.train.preempt import REQUEUE_EXIT_CODE


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


# ---------------------------------------------------------------- signal path, exact resume

@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 2-epoch run: the reference the interrupted runs must reproduce."""
    out = tmp_path_factory.mktemp("straight")
    subprocess.run([sys.executable, "main_moco.py"] + TINY + ["--epochs", "2", "--output-dir", str(out)],
                   cwd=ROOT, env=clean_env(), check=True, capture_output=True, timeout=CHILD_WAIT_S)
    return out / "checkpoint_last.pth.tar"


@pytest.mark.long
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


@pytest.mark.long
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
