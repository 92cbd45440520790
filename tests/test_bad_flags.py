"""Bad flag values (batch size, lr, crop size, epochs) are one sentence before any work, on the
training scripts and main_knn.py."""
import os

import pytest
from conftest import SYNTHETIC, run_inline

import main_knn
import main_lincls
import main_moco
import main_simclr


MAINS = {"main_moco.py": main_moco.main, "main_simclr.py": main_simclr.main, "main_lincls.py": main_lincls.main}

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
