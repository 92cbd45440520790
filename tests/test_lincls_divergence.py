"""A diverging linear probe is recognised (lincls/train_eval.py diverging) and main_lincls.py
says so with the fix."""
import pytest
from conftest import SYNTHETIC, run_script


def test_probe_divergence_is_recognised():
    from lincls.train_eval import diverging
    assert diverging(1514.0, 1.2, 57.6, 71.4, 2)  # the small-dataset lr 30 run of the issue
    assert diverging(float("nan"), 1.2, 10.0, 71.4, 10)
    assert diverging(4608.0, 9000.0, 34.4, 30.0, 8)  # huge from the start, even while top-1 rises
    assert diverging(15.0, 1.2, 50.0, 71.4, 10)  # 12x its lowest and 21 points below its best
    assert not diverging(1.3, 1.2, 70.0, 71.4, 10)  # noise
    assert not diverging(15.0, 1.2, 72.0, 71.4, 10)  # loss up but accuracy still rising


@pytest.mark.slow
def test_lincls_says_when_the_reference_lr_blows_the_probe_up(tmp_path):
    proc = run_script("main_lincls.py", SYNTHETIC + ["--synthetic-size", "128", "-b", "32", "--epochs", "1",
                                                     "--pretrained", "none", "--seed", "1", "--output-dir",
                                                     str(tmp_path)])  # lr 30, the reference probe
    assert "the probe is diverging" in proc.stdout and "add --head-bn" in proc.stdout
