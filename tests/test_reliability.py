"""Reliability: one seed per run on every launcher, refused resumes that would build another
model, and the run's folder checked before any work."""
import json
import os
import shutil
import socket
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CHILD_WAIT_S, ROOT, SYNTHETIC, run_inline, run_script
from PIL import Image

import main_knn
import main_lincls
import main_moco
import main_simclr
from common.ckpt.resume import run_seed

MAINS = {"main_moco.py": main_moco.main, "main_simclr.py": main_simclr.main, "main_lincls.py": main_lincls.main,
         "main_knn.py": main_knn.main}

TINY = SYNTHETIC + ["--synthetic-size", "64", "-b", "16", "--moco-k", "32", "--moco-dim", "16",
                    "--mlp", "--aug-plus", "--bn-splits", "2", "-p", "2"]

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


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_epoch")
    run_script("main_moco.py", TINY + ["--seed", "1", "--epochs", "1", "--output-dir", str(out)])
    return out


@pytest.mark.parametrize("flag, value, stored", [("--moco-k", "64", "--moco-k 32"), ("--moco-dim", "8", "--moco-dim 16"),
                                                 ("--small-images", None, "--small-images off")])
@pytest.mark.slow
def test_resume_with_another_model_flag_names_the_flag(one_epoch, flag, value, stored):
    extra = [flag] + ([value] if value else [])
    proc = run_script("main_moco.py", TINY + extra + ["--epochs", "2", "--resume", "auto", "--output-dir",
                                                      str(one_epoch)], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"was trained with {stored}" in proc.stderr and f"pass the same {flag}" in proc.stderr


# ---------------------------------------------------------------- training that cannot succeed

@pytest.mark.slow
def test_nan_loss_stops_before_overwriting_the_last_good_checkpoint(one_epoch, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(one_epoch, out)
    before = (out / "checkpoint_last.pth.tar").read_bytes()
    proc = run_script("main_moco.py", TINY + ["--seed", "1", "--epochs", "2", "--resume", "auto", "--lr", "1e30",
                                              "--output-dir", str(out)], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "the loss became NaN/inf at epoch 1" in proc.stderr and "lower --lr (it is 1e+30)" in proc.stderr
    assert "checkpoint_last.pth.tar is the last good checkpoint" in proc.stderr
    assert (out / "checkpoint_last.pth.tar").read_bytes() == before
    assert not (out / "checkpoint_0002.pth.tar").exists()


def test_probe_divergence_is_recognised():
    from lincls.train_eval import diverging
    assert diverging(1514.0, 1.2, 57.6, 71.4, 2)  # the small-dataset lr 30 run of the issue
    assert diverging(float("nan"), 1.2, 10.0, 71.4, 10)
    assert diverging(4608.0, 9000.0, 34.4, 30.0, 8)  # huge from the start, even while top-1 rises
    assert diverging(15.0, 1.2, 50.0, 71.4, 10)  # 12x its lowest and 21 points below its best
    assert not diverging(1.3, 1.2, 70.0, 71.4, 10)  # noise
    assert not diverging(15.0, 1.2, 72.0, 71.4, 10)  # loss up but accuracy still rising


BAD_FLAGS = [
    (["-b", "0"], "--batch-size 0 must be at least 1"),
    (["-b", "-4"], "--batch-size -4 must be at least 1"),
    (["--lr", "-1"], "--lr -1.0 must be a finite number >= 0"),
    (["--lr", "nan"], "--lr nan must be a finite number >= 0"),
    (["--crop-size", "0"], "--crop-size 0 must be a positive number of pixels"),
    (["--crop-size", "-5"], "--crop-size -5 must be a positive number of pixels"),
    (["--epochs", "0"], "--epochs 0 trains nothing"),
]


# every flag on main_moco.py; the other training scripts share the check (common/cli.py): two each
@pytest.mark.slow
def test_lincls_says_when_the_reference_lr_blows_the_probe_up(tmp_path):
    proc = run_script("main_lincls.py", SYNTHETIC + ["--synthetic-size", "128", "-b", "32", "--epochs", "1",
                                                     "--pretrained", "none", "--seed", "1", "--output-dir",
                                                     str(tmp_path)])  # lr 30, the reference probe
    assert "the probe is diverging" in proc.stdout and "add --head-bn" in proc.stdout


@pytest.mark.parametrize("script, args, message", [("main_moco.py", a, m) for a, m in BAD_FLAGS]
                         + [(s, a, m) for s in ("main_simclr.py", "main_lincls.py") for a, m in BAD_FLAGS[2::4]])
def test_bad_flags_are_one_sentence_before_any_work(tmp_path, script, args, message, capsys):
    extra = ["--pretrained", "none"] if script == "main_lincls.py" else []
    proc = run_inline(capsys, MAINS[script], SYNTHETIC + extra + args + ["--output-dir", str(tmp_path)], check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not os.listdir(tmp_path)


def test_main_knn_refuses_a_bad_batch_size(capsys):
    proc = run_inline(capsys, main_knn.main, SYNTHETIC + ["--pretrained", "none", "-b", "0"], check=False)
    assert proc.returncode == 2 and "--batch-size 0 must be at least 1" in proc.stderr


# ---------------------------------------------------------------- the output folder

def test_output_dir_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    path = tmp_path / "not_a_folder"
    path.write_text("x")
    for script, extra in (("main_moco.py", []), ("main_lincls.py", ["--pretrained", "none"]),
                          ("main_knn.py", ["--pretrained", "none"])):
        proc = run_inline(capsys, MAINS[script], SYNTHETIC + extra + ["--output-dir", str(path)], check=False)
        assert proc.returncode == 2 and "is a file, not a folder" in proc.stderr, script


def test_unwritable_output_dir_is_refused_before_any_work(tmp_path, capsys):
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # root writes into read-only folders; not into /proc
        target, restore = "/proc/no_checkpoints_here/run", None
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        target, restore = str(ro / "run"), ro
    try:
        proc = run_inline(capsys, main_moco.main, TINY + ["--epochs", "1", "--output-dir", target], check=False)
        assert proc.returncode == 2 and "cannot write to --output-dir" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        if restore is not None:
            restore.chmod(0o755)


def test_too_little_space_and_stale_temp_files(tmp_path, capsys):
    from common.ckpt.io import check_free_space, prepare_output_dir
    from common.errors import UserError
    with pytest.raises(UserError, match="MiB free but one checkpoint needs about"):
        check_free_space(str(tmp_path), shutil.disk_usage(tmp_path).free + 2 ** 40)
    check_free_space(str(tmp_path), 1)
    for name in (".tmp_abc.pth.tar", "checkpoint_0001.pth.tar.tmp_link"):
        (tmp_path / name).write_bytes(b"half a checkpoint")
    (tmp_path / "checkpoint_last.pth.tar").write_bytes(b"kept")
    prepare_output_dir(str(tmp_path), lock=False)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_last.pth.tar"]
    assert "removed 2 unfinished checkpoint write(s)" in capsys.readouterr().out


def test_a_disk_that_fills_mid_run_is_one_sentence_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import collections
    import errno

    from common.ckpt import io as checkpoint
    from common.errors import UserError
    checkpoint.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, str(tmp_path), epoch_file=False)

    def full_disk(error):
        def save(obj, f):
            f.write(b"half a checkpoint")
            raise error
        return save

    # torch's zip writer reports the full disk as a RuntimeError deep in torch.serialization
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage(2 ** 40, 2 ** 40, 2 ** 20))
    for error in (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 54885056 vs 54884944"),
                  OSError(errno.ENOSPC, "No space left on device")):
        monkeypatch.setattr(checkpoint.torch, "save", full_disk(error))
        with pytest.raises(UserError, match="1 MiB free on that disk.*another --output-dir.*previous one is intact"):
            checkpoint.save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, str(tmp_path))
        assert sorted(os.listdir(tmp_path)) == ["checkpoint_last.pth.tar"]
        assert torch.equal(torch.load(tmp_path / "checkpoint_last.pth.tar")["w"], torch.ones(3))
    # with space left, a RuntimeError is not about the disk: it stays what it is
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage(2 ** 40, 0, 2 ** 40))
    monkeypatch.setattr(checkpoint.torch, "save", full_disk(RuntimeError("something else")))
    with pytest.raises(RuntimeError, match="something else"):
        checkpoint.save_checkpoint({"epoch": 2}, str(tmp_path))


def test_checkpoint_writes_get_the_umask_mode_without_touching_the_umask(tmp_path, monkeypatch):
    from common.ckpt import io as checkpoint
    real_save, temps = torch.save, []

    def save(obj, f):  # what a kill mid-write would leave behind: prepare_output_dir must know the name
        temps.append(os.path.basename(f.name))
        real_save(obj, f)
    old = os.umask(0o022)
    try:
        # os.umask(0) then os.umask(mask) would give files another thread creates meanwhile mode 0666
        monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("the umask was changed"))
        monkeypatch.setattr(checkpoint.torch, "save", save)
        checkpoint.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, str(tmp_path))
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_0001.pth.tar", "checkpoint_last.pth.tar"]
    assert stat.S_IMODE(os.stat(tmp_path / "checkpoint_last.pth.tar").st_mode) == 0o644
    assert len(temps) == 1 and temps[0].startswith(".tmp_") and temps[0].endswith(".pth.tar"), temps


@pytest.mark.slow
def test_checkpoints_respect_the_umask_and_auto_resume_says_it_starts_fresh(tmp_path):
    old = os.umask(0o022)
    try:
        proc = run_script("main_moco.py", TINY + ["--seed", "1", "--epochs", "1", "--resume", "auto",
                                                  "--output-dir", str(tmp_path)])
    finally:
        os.umask(old)
    assert "no checkpoint in" in proc.stdout and "starting a new run" in proc.stdout
    assert stat.S_IMODE(os.stat(tmp_path / "checkpoint_last.pth.tar").st_mode) == 0o644


@pytest.mark.slow
def test_metrics_keep_one_line_per_epoch_after_a_kill_between_line_and_checkpoint(tmp_path):
    run_script("main_moco.py", TINY + ["--seed", "1", "--epochs", "2", "--output-dir", str(tmp_path)])
    # as if killed after epoch 1's metrics line but before its checkpoint
    shutil.copy(tmp_path / "checkpoint_0001.pth.tar", tmp_path / "checkpoint_last.pth.tar")
    run_script("main_moco.py", TINY + ["--seed", "1", "--epochs", "2", "--resume", "auto", "--output-dir",
                                       str(tmp_path)])
    epochs = [json.loads(line)["epoch"] for line in open(tmp_path / "metrics.jsonl")]
    assert epochs == [0, 1]


def test_pickled_objects_are_refused_in_one_sentence(tmp_path):
    import argparse

    from common.ckpt.io import load_checkpoint
    from common.errors import UserError
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, tmp_path / "foreign.pth.tar")
    with pytest.raises(UserError, match="it holds pickled Python objects besides tensors") as e:
        load_checkpoint(str(tmp_path / "foreign.pth.tar"))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- images read right

def test_16_bit_png_exif_rotation_and_symlink_loops(tmp_path):
    from common.data.images import image_folder, pil_loader
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    x = np.asarray(pil_loader(str(tmp_path / "g16.png")))
    assert x.shape == (64, 64, 3) and x.max() == 255 and x.min() == 0 and 120 < x.mean() < 135  # not all white
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert pil_loader(str(tmp_path / "rot.jpg")).size == (20, 40)
    os.makedirs(tmp_path / "ds" / "c" / "sub")
    Image.new("RGB", (8, 8)).save(tmp_path / "ds" / "c" / "0.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "ds" / "c" / "sub" / "1.png")
    os.symlink(tmp_path / "ds" / "c", tmp_path / "ds" / "c" / "sub" / "loop")
    assert len(image_folder(str(tmp_path / "ds")).samples) == 2


def test_csv_labels_are_stripped_and_case_clashes_warned(tmp_path, capsys):
    from common.data.images import csv_manifest
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "train.csv").write_text("path,label\na.png,Cat \nb.png, Cat\nc.png,cat\n")
    ds = csv_manifest(str(tmp_path / "train.csv"))
    assert ds.classes == ["Cat", "cat"] and ds.targets == [0, 0, 1]
    assert "differ only in case" in capsys.readouterr().err
