"""How many checkpoints a run keeps (--keep-checkpoints, --keep-epochs) and the disk line
it prints before its first step."""
import argparse
import os

import pytest
from conftest import SYNTHETIC, run_inline

import main_lincls
import main_moco
from common.ckpt.retention import checkpoint_disk_plan, epoch_file_due, prune_epoch_checkpoints


def _args(**kw) -> argparse.Namespace:
    values = dict(epochs=352, save_freq=1, keep_checkpoints=5, keep_epochs=[], output_dir="runs/x")
    values.update(kw)
    return argparse.Namespace(**values)


def test_prune_keeps_exactly_the_bound_and_the_protected_epochs(tmp_path):
    for e in range(1, 13):
        (tmp_path / f"checkpoint_{e:04d}.pth.tar").write_bytes(b"x")
    for other in ("checkpoint_last.pth.tar", "model_best.pth.tar", "notes.txt"):
        (tmp_path / other).write_bytes(b"x")
    removed = prune_epoch_checkpoints(str(tmp_path), keep=3, protected=[2, 11])
    epochs = sorted(int(n[11:15]) for n in os.listdir(tmp_path) if n[11:15].isdigit())
    # the bound counts the unprotected files: 3 most recent of them, plus the protected 2 and 11
    assert epochs == [2, 9, 10, 11, 12] and len(removed) == 7
    assert {"checkpoint_last.pth.tar", "model_best.pth.tar", "notes.txt"} <= set(os.listdir(tmp_path))
    assert prune_epoch_checkpoints(str(tmp_path), keep=0) == []  # 0 keeps every one


def test_epoch_files_follow_save_freq_the_end_and_keep_epochs():
    args = _args(epochs=10, save_freq=4, keep_epochs=[3])
    assert [e for e in range(1, 11) if epoch_file_due(args, e)] == [3, 4, 8, 10]
    assert [e for e in range(1, 11) if epoch_file_due(_args(epochs=10, save_freq=0), e)] == []  # lincls' default


def test_disk_line_counts_the_kept_checkpoints_and_warns_when_they_do_not_fit():
    """The issue's case: 352 epochs at --save-freq 1, 92 MB each: by default 5 epoch files,
    checkpoint_last and the one being written (7 x 92 MB), not 352 of them."""
    size = 92 * 10 ** 6
    line = checkpoint_disk_plan(_args(), size, free=10 * 2 ** 30)
    assert line.startswith("=> checkpoints: checkpoint_last and 5 of 352 checkpoint_NNNN (the 5 most recent")
    assert f"need up to {7 * size / 2 ** 20:.0f} MiB" in line and "warning" not in line
    everything = checkpoint_disk_plan(_args(keep_checkpoints=0), size, free=10 * 2 ** 30)
    assert "352 checkpoint_NNNN" in everything and "30.3 GiB" in everything
    assert "\nwarning: the checkpoints need about 30.3 GiB but runs/x has 10.0 GiB free" in everything


@pytest.mark.slow
def test_a_run_prints_the_disk_and_eta_and_keeps_the_bound(tmp_path, capsys):
    """Three epochs with --keep-checkpoints 1 --keep-epochs 1: the disk line before the first
    step, the ETA line after the first steps, and on disk checkpoint_last, checkpoint_0001
    (asked for) and checkpoint_0003 (the most recent) only."""
    out = run_inline(capsys, main_moco.main, SYNTHETIC + [
        "--synthetic-size", "64", "-b", "16", "--moco-k", "32", "--moco-dim", "16", "--bn-splits", "2",
        "--epochs", "3", "--keep-checkpoints", "1", "--keep-epochs", "1", "-p", "100",
        "--output-dir", str(tmp_path)]).stdout
    assert ("=> checkpoints: checkpoint_last and 2 of 3 checkpoint_NNNN (the 1 most recent: --keep-checkpoints, "
            "and --keep-epochs)") in out
    assert out.index("=> checkpoints:") < out.index("=> ETA: about") < out.index("Epoch [0/3]")
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint")) == [
        "checkpoint_0001.pth.tar", "checkpoint_0003.pth.tar", "checkpoint_last.pth.tar"]


def test_lincls_takes_the_retention_flags():
    args = main_lincls.get_args_parser().parse_args(["DATA", "--keep-checkpoints", "2", "--keep-epochs", "5"])
    assert args.keep_checkpoints == 2 and args.keep_epochs == [5] and args.save_freq == 0
