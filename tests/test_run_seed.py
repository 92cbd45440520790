"""One seed per run: torchrun processes started without --seed agree on rank 0's, and a resumed
run keeps its own (common/ckpt/resume.py run_seed)."""
import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import CHILD_WAIT_S, MOCO_TINY as TINY, ROOT

from common.ckpt.resume import run_seed


# one torchrun-started process: its own finalize_args (which draws its own seed when --seed
# is missing), then the scripts' worker start, then the sampler the scripts build
WORKER = r"""
import json, sys
import main_moco
from common.data.loader import ResumableSampler
from common.distributed.collectives import cleanup
from common.distributed.launch import start_worker
args = main_moco.finalize_args(main_moco.get_args_parser().parse_args(sys.argv[2:]))
drawn = args.seed
env, batch, _ = start_worker(None, args)
sampler = ResumableSampler(64, env.world_size, env.rank, seed=env.seed, drop_last=True)
sampler.set_epoch(1)
json.dump({"drawn": drawn, "seed": env.seed, "indices": [i for i, _ in sampler]}, open(sys.argv[1], "w"))
cleanup()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
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
        out, err = p.communicate(timeout=CHILD_WAIT_S)
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
