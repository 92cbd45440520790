"""Shared fixtures: generated data, a script runner, and one MoCo pretraining run that
the learning, lincls and kNN tests all reuse (pretraining is the slow part on CPU)."""
import errno
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Callable, List, NamedTuple

import numpy as np
import pytest
from PIL import Image

if TYPE_CHECKING:
    import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# README's test command runs two xdist workers: one thread each (set before torch is imported;
# the scripts the tests start inherit it), so the two share the cores instead of fighting over them
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

# the folder listings the scripts cache (common/data/listing.py) go to a temporary folder, not the
# user's ~/.cache; the scripts the tests start inherit it
if not os.environ.get("SSL_PRETRAIN_LISTINGS"):
    import tempfile
    os.environ["SSL_PRETRAIN_LISTINGS"] = tempfile.mkdtemp(prefix="listings-")

# Fast, still learnable: resnet18 with the ImageNet stem on 32 px synthetic images (class =
# hue, layout random). 16 steps of this MoCo config (BN groups of 32, fast key encoder
# m=0.9, mild colour jitter since the class is the hue, the queue one batch: a tenth of the
# 512 images rounded up) lift kNN top-1 well above the untrained network's; the measured
# spread over seeds is beside the test that relies on it (test_main_moco.py).
SYNTHETIC = ["--dataset", "synthetic", "-a", "resnet18", "--no-small-images", "-j", "0"]
MOCO_LEARN = SYNTHETIC + ["--synthetic-size", "512", "-b", "64", "--moco-k", "64", "--moco-t", "0.2",
                          "--moco-m", "0.9", "--lr", "0.1", "--mlp", "--aug-plus", "--bn-splits", "2",
                          "--color-strength", "0.25", "--epochs", "2", "--seed", "1", "-p", "1000"]
# The tiny MoCo run of the seed, resume-flag, loss-guard and checkpoint tests: 4 steps per epoch
MOCO_TINY = SYNTHETIC + ["--synthetic-size", "64", "-b", "16", "--moco-k", "32", "--moco-dim", "16",
                         "--mlp", "--aug-plus", "--bn-splits", "2", "-p", "2", "--no-payoff"]
# the learning tests' kNN: the pretraining images plus 1,536 more in the bank, 512 val
# images (the 128 of a 512-image run's monitor leave a 4-point sampling spread alone)
LEARNING_KNN_IMAGES = 2048


def pytest_collection_modifyitems(items) -> None:
    """Tests marked `long` first (a stable sort keeps the rest in file order): with two xdist
    workers, a long test handed out last runs alone while the other worker sits idle."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


def learning_knn(output_dir, image_size: int = 32):
    """KnnMonitor (k=20, T=0.07) on LEARNING_KNN_IMAGES synthetic images of `image_size` px
    (resized to the 32 px crop)."""
    import torch

    import main_moco
    from common.distributed.collectives import DistEnv
    from common.eval.monitor import KnnMonitor
    argv = SYNTHETIC + ["--synthetic-size", str(LEARNING_KNN_IMAGES), "--synthetic-image-size", str(image_size),
                        "--crop-size", "32", "-b", "64", "--moco-k", "64", "--output-dir", str(output_dir)]
    args = main_moco.finalize_args(main_moco.get_args_parser().parse_args(argv))
    return KnnMonitor(args, DistEnv(0, 1, 0, torch.device("cpu"), False))


def untrained_knn(knn, seed: int = 0) -> float:
    """kNN top-1 of the untrained control: a random-init resnet18 (ImageNet stem) whose
    BatchNorm statistics are estimated on the bank's images, as a trained network's are."""
    import torch

    from common.nets.batchnorm import recalibrate_batchnorm
    from common.nets.models import build_backbone
    torch.manual_seed(seed)
    return knn.evaluate(recalibrate_batchnorm(build_backbone("resnet18", small_images=False), knn.train))["knn_top1"]


@pytest.fixture(autouse=True)
def release_run_locks():
    """A test that calls a script's finalize_args in this process takes its output folder's
    lock (common/files/lock.py) for the life of the pytest process: give it back after the
    test, as the script's main() does when it ends."""
    yield
    from common.files import lock
    lock.release()


def run_script(script: str, args: List[str], check: bool = True, env_extra=None, timeout: int = 600):
    """Run `python <script> args` from the repo root as a user would; returns CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": ROOT, **(env_extra or {})}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script)] + args, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_main(main: Callable[[List[str]], object], argv: List[str]) -> int:
    """A script's main(argv) in this process (no interpreter start-up: most of a tiny run's
    CPU time); returns the exit status. The SIGUSR1/SIGTERM handlers a run installs
    (preemption) are put back afterwards, so later tests see pytest's."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        main(argv)
        return 0
    except SystemExit as e:
        return e.code
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


# A child's line is awaited as long as the child runs: on a busy 2-core machine its first step
# once came after 120 s (a test must not fail only because the machine is slow); the ceiling
# only stops a hung child from holding CI.
CHILD_WAIT_S = 900


def clean_env(**extra) -> dict:
    """The test's environment without any SLURM_*/torchrun variables of the machine running it;
    one thread (bit-reproducible runs), unbuffered output (lines arrive as they are printed)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                       "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = CHILD_WAIT_S) -> str:
    """Read the child's stdout until a line contains `needle`; returns everything read."""
    seen, t0 = [], time.time()
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return "".join(seen)
        assert time.time() - t0 < timeout, "".join(seen)
    raise AssertionError(f"process ended before printing {needle!r}:\n" + "".join(seen))


def kill_after_line(proc: subprocess.Popen, needle: str) -> None:
    """SIGKILL the child once it printed `needle` (no handler of its own runs: a hard kill)."""
    try:
        wait_for_line(proc, needle)
        proc.kill()
        proc.wait(timeout=CHILD_WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()


def assert_same_weights(a_path, b_path) -> None:
    """Two checkpoints at the same epoch end hold bitwise the same weights, buffers and
    optimizer momentum (the interrupted run reproduced the uninterrupted one)."""
    import torch
    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (a_path, b_path))
    assert a["epoch"] == b["epoch"] and a.get("iteration", 0) == b.get("iteration", 0) == 0
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


class Ran(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def run_inline(capsys, main: Callable[[List[str]], object], argv: List[str], check: bool = True) -> Ran:
    """run_main with what the script printed (pytest's capsys), shaped like run_script's
    CompletedProcess: the same checks without an interpreter start (a few seconds a run)."""
    capsys.readouterr()
    code = run_main(main, argv) or 0
    out, err = capsys.readouterr()
    if check and code != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({code}):\n{out[-3000:]}\n{err[-3000:]}")
    return Ran(code, out, err)


def built_once(tmp_path_factory, name: str, build: Callable[[str], object]) -> str:
    """A folder `build(folder)` fills once per test run: a session fixture is otherwise built
    again by each xdist worker (a training run of tens of seconds twice). The workers share the
    run's temp root and take turns on a lock file; the first builds, the others wait and reuse.
    Tests read the folder, never write into it (one that must, copies it first)."""
    import fcntl
    import shutil
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = str(tmp_path_factory.mktemp(name))
        build(folder)
        return folder
    root = tmp_path_factory.getbasetemp().parent  # pytest-of-<user>/pytest-<n>: this run's, every worker's
    folder, done = os.path.join(root, name), os.path.join(root, name + ".done")
    with open(os.path.join(root, name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(done):
            shutil.rmtree(folder, ignore_errors=True)  # a worker that failed half-way
            os.makedirs(folder)
            build(folder)
            open(done, "w").close()
    return folder


@pytest.fixture(scope="session")
def moco_pretrained(tmp_path_factory) -> str:
    """Checkpoint of a short MoCo v2 run on synthetic data that has learned something."""
    # one thread: CPU kernels then sum in one fixed order, so the run is bit-reproducible
    # --export-at-end: tests/test_hub.py loads the run's exported/ backbone (no run of its own)
    out = built_once(tmp_path_factory, "moco_pretrained", lambda folder: run_script(
        "main_moco.py", MOCO_LEARN + ["--output-dir", folder, "--export-at-end"], env_extra={"OMP_NUM_THREADS": "1"}))
    return os.path.join(out, "checkpoint_last.pth.tar")


@pytest.fixture(scope="session")
def one_epoch(tmp_path_factory):
    """One epoch of MOCO_TINY (seed 1): the run that test_resume_flags.py and test_loss_guard.py
    resume (the NaN test copies it first)."""
    import pathlib
    return pathlib.Path(built_once(tmp_path_factory, "one_epoch", lambda folder: run_script(
        "main_moco.py", MOCO_TINY + ["--seed", "1", "--epochs", "1", "--output-dir", folder])))


@pytest.fixture
def read_only_dir(tmp_path, monkeypatch):
    """A folder no file can be created in."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
    except PermissionError:
        pass
    else:  # root ignores the mode bits: refuse creating files there as the kernel would for anyone else
        (folder / "probe").unlink()
        real_open, real_mkdir = os.open, os.mkdir

        def refuse(real):
            def call(path, *args, **kwargs):
                if os.path.abspath(path).startswith(str(folder) + os.sep):
                    raise PermissionError(errno.EACCES, "Permission denied", str(path))
                return real(path, *args, **kwargs)
            return call
        monkeypatch.setattr(os, "open", refuse(real_open))
        monkeypatch.setattr(os, "mkdir", refuse(real_mkdir))
    yield folder
    folder.chmod(0o755)


@pytest.fixture(scope="session")
def moco_untrained(tmp_path_factory) -> str:
    """The control for moco_pretrained: the same run with --lr 0, so the same initial weights
    with BatchNorm statistics from the same 16 batches, loadable by every script. What the
    probes gain over it is what training the weights bought; `--pretrained none` (a fresh
    network's identity statistics) is another model, not that baseline."""
    lr = MOCO_LEARN.index("--lr")
    out = built_once(tmp_path_factory, "moco_untrained", lambda folder: run_script(
        "main_moco.py", MOCO_LEARN[:lr + 1] + ["0"] + MOCO_LEARN[lr + 2:] + ["--output-dir", folder],
        env_extra={"OMP_NUM_THREADS": "1"}))
    return os.path.join(out, "checkpoint_last.pth.tar")


def write_image_folder(root, classes=("a", "b"), per_class=4, size=16, seed=0, split_dirs=("train",)):
    """An ImageFolder of random PNGs: root/<split>/<class>/<i>.png."""
    rng = np.random.default_rng(seed)
    for split in split_dirs:
        for c in classes:
            d = os.path.join(root, split, c) if split else os.path.join(root, c)
            os.makedirs(d, exist_ok=True)
            for i in range(per_class):
                arr = (rng.uniform(0, 255, size=(size, size, 3))).astype(np.uint8)
                Image.fromarray(arr).save(os.path.join(d, f"{i}.png"))
    return str(root)


def _randomise_bn(model: "nn.Module") -> "nn.Module":
    """Non-trivial BN statistics, so a stem or buffer left out of the export shows."""
    import torch
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def _save(path, model: "nn.Module", method, small_images=True, with_args=True, arch="resnet18"):
    import torch
    ckpt = {"state_dict": {"module." + k: v for k, v in model.state_dict().items()}, "arch": arch,
            "method": method}
    if with_args:
        ckpt["args"] = {"small_images": small_images, "crop_size": 32}
    torch.save(ckpt, path)
    return str(path)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Random-init MoCo, SimCLR, lincls and facebookresearch/moco (resnet50) checkpoints with
    non-trivial BN statistics: what test_export.py and test_export_writes.py export."""
    import functools

    import torch

    from common.nets.models import build_backbone
    from moco.builder import MoCo
    from simclr.builder import SimCLR
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    moco = _randomise_bn(MoCo(functools.partial(build_backbone, "resnet18", small_images=True), 16, 32, mlp=True))
    simclr = _randomise_bn(SimCLR(lambda: build_backbone("resnet18", small_images=True), proj_dim=16))
    lincls = _randomise_bn(build_backbone("resnet18", num_classes=3, small_images=True))
    reference = _randomise_bn(MoCo(functools.partial(build_backbone, "resnet50"), 128, 64, mlp=True))
    return {"moco": _save(root / "moco.pth.tar", moco, "moco"),
            "simclr": _save(root / "simclr.pth.tar", simclr, "simclr"),
            "lincls": _save(root / "lincls.pth.tar", lincls, "lincls"),
            # facebookresearch/moco: ImageNet stem, no args, no method
            "reference": _save(root / "reference.pth.tar", reference, None, small_images=False, with_args=False,
                                 arch="resnet50")}
