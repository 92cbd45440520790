"""A run never destroys another: an --output-dir that holds a run is refused unless the
command continues it (--resume) or says --overwrite; nothing in it is touched first."""
import hashlib
import os

import pytest
from conftest import SYNTHETIC, run_main

import main_lincls
import main_moco

TINY = SYNTHETIC + ["--synthetic-size", "64", "-b", "16", "--moco-k", "32", "--moco-dim", "16", "--bn-splits", "2",
                    "--seed", "3", "-p", "100", "--no-payoff"]


def digest(folder) -> dict:
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest() for n in sorted(os.listdir(folder))}


@pytest.mark.slow
def test_a_forgotten_resume_is_refused_and_overwrite_replaces_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(main_moco.main, TINY + ["--epochs", "2", "--output-dir", str(out)]) == 0
    before = digest(out)
    assert "checkpoint_0002.pth.tar" in before and "metrics.jsonl" in before
    capsys.readouterr()

    assert run_main(main_moco.main, TINY + ["--epochs", "1", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run (checkpoint_0001.pth.tar, checkpoint_0002.pth.tar, checkpoint_last.pth.tar" in err
    assert "--resume auto to continue it, another --output-dir for a new run, or --overwrite" in err
    assert digest(out) == before  # not a byte changed

    assert run_main(main_moco.main, TINY + ["--epochs", "1", "--output-dir", str(out), "--overwrite"]) == 0
    assert "--overwrite: removed the earlier run's" in capsys.readouterr().out
    after = set(os.listdir(out))
    assert "checkpoint_0002.pth.tar" not in after and "checkpoint_0001.pth.tar" in after  # only the new run's
    assert len(open(out / "metrics.jsonl").read().splitlines()) == 1


@pytest.mark.slow
def test_a_logreg_probe_into_an_sgd_probe_folder_is_refused(moco_pretrained, tmp_path, capsys):
    out = tmp_path / "probe"
    probe = SYNTHETIC + ["--synthetic-size", "64", "-b", "32", "--epochs", "1", "--seed", "2", "-p", "100",
                         "--pretrained", moco_pretrained, "--output-dir", str(out)]
    assert run_main(main_lincls.main, probe) == 0
    before = digest(out)
    capsys.readouterr()
    assert run_main(main_lincls.main, probe + ["--probe", "logreg"]) == 2
    assert "already holds a run" in capsys.readouterr().err and digest(out) == before
    # --evaluate and --resume read the folder's run: allowed
    assert run_main(main_lincls.main, probe + ["--evaluate"]) == 0
