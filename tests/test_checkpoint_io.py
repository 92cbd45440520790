"""Checkpoint files on disk (common/ckpt/io.py): free space, stale temp files, a disk that fills
mid-write, the umask, one metrics line per epoch after a kill, and pickled objects refused."""
import json
import os
import shutil
import stat

import pytest
import torch
from conftest import MOCO_TINY as TINY, run_script


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
    """Any pickled object but an argparse.Namespace (which DINO's released checkpoints hold under
    "args", tests/test_dino.py) is refused."""
    import fractions

    from common.ckpt.io import load_checkpoint
    from common.errors import UserError
    torch.save({"state_dict": {}, "args": fractions.Fraction(1, 3)}, tmp_path / "foreign.pth.tar")
    with pytest.raises(UserError, match="it holds pickled Python objects besides tensors") as e:
        load_checkpoint(str(tmp_path / "foreign.pth.tar"))
    assert "\n" not in str(e.value)
