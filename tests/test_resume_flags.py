"""A resume with another model flag (--moco-k, --moco-dim, --small-images) than its checkpoint's
is refused in one sentence that names the flag."""
import pytest
from conftest import MOCO_TINY as TINY, run_script


@pytest.mark.parametrize("flag, value, stored", [("--moco-k", "64", "--moco-k 32"), ("--moco-dim", "8", "--moco-dim 16"),
                                                 ("--small-images", None, "--small-images off")])
@pytest.mark.slow
def test_resume_with_another_model_flag_names_the_flag(one_epoch, flag, value, stored):
    extra = [flag] + ([value] if value else [])
    proc = run_script("main_moco.py", TINY + extra + ["--epochs", "2", "--resume", "auto", "--output-dir",
                                                      str(one_epoch)], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"was trained with {stored}" in proc.stderr and f"pass the same {flag}" in proc.stderr
