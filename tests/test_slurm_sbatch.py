"""The sbatch scripts (slurm/): bash syntax, #SBATCH headers, one resuming srun line, and dry runs
with srun/scontrol stubs."""
import os
import subprocess

import pytest
from conftest import ROOT, clean_env


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
