"""The loss guard: a NaN/inf loss stops the run before it overwrites the last good checkpoint."""
import shutil

import pytest
from conftest import MOCO_TINY as TINY, run_script


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
