"""Reliability: one seed per run on every launcher, refused resumes that would build another
model, and the run's folder checked before any work."""
import json
import os
import socket
import subprocess
import sys

import pytest

from common.checkpoint import run_seed
from conftest import ROOT, SYNTHETIC, run_script

TINY = SYNTHETIC + ["--synthetic-size", "64", "-b", "16", "--moco-k", "32", "--moco-dim", "16",
                    "--mlp", "--aug-plus", "--bn-splits", "2", "-p", "2"]

# one torchrun-started process: its own finalize_args (which draws its own seed when --seed
# is missing), then the scripts' worker start, then the sampler the scripts build
WORKER = r"""
import json, sys
import main_moco
from common.data import ResumableSampler
from common.dist import cleanup, start_worker
args = main_moco.finalize_args(main_moco.get_args_parser().parse_args(sys.argv[2:]))
drawn = args.seed
env, batch, _ = start_worker(None, args)
sampler = ResumableSampler(64, env.world_size, env.rank, seed=args.seed, drop_last=True)
sampler.set_epoch(1)
json.dump({"drawn": drawn, "seed": args.seed, "indices": [i for i, _ in sampler]}, open(sys.argv[1], "w"))
cleanup()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_processes_without_seed_agree_on_one_and_see_every_index_once(tmp_path):
    port = free_port()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(PYTHONPATH=ROOT, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / f"rank{rank}.json")] + TINY +
                                      ["--cpu"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, out + err
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["drawn"] != r1["drawn"]  # each process drew its own seed...
    assert r0["seed"] == r1["seed"] == r0["drawn"]  # ...and all use rank 0's
    assert sorted(r0["indices"] + r1["indices"]) == list(range(64))  # every image once per epoch


def test_resume_keeps_the_runs_seed():
    assert run_seed(None, {"seed": 123}) == 123
    assert run_seed(7, {"seed": 123}) == 123  # a resumed run continues its own data order
    assert run_seed(7, {}) == 7
    assert 0 <= run_seed(None, {}) < 2 ** 31


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_epoch")
    run_script("main_moco.py", TINY + ["--seed", "1", "--epochs", "1", "--output-dir", str(out)])
    return out


@pytest.mark.parametrize("flag, value, stored", [("--moco-k", "64", "--moco-k 32"), ("--moco-dim", "8", "--moco-dim 16"),
                                                 ("--small-images", None, "--small-images off")])
def test_resume_with_another_model_flag_names_the_flag(one_epoch, flag, value, stored):
    extra = [flag] + ([value] if value else [])
    proc = run_script("main_moco.py", TINY + extra + ["--epochs", "2", "--resume", "auto", "--output-dir",
                                                      str(one_epoch)], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"was trained with {stored}" in proc.stderr and f"pass the same {flag}" in proc.stderr
