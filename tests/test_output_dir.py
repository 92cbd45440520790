"""The run's folder: an --output-dir that holds a run is refused unless the command continues it
(--resume) or says --overwrite, nothing in it touched first; one that is a file or cannot be
written is refused before any work."""
import hashlib
import os

import pytest
from conftest import SYNTHETIC, run_inline, run_main

import main_knn
import main_lincls
import main_moco

MAINS = {"main_moco.py": main_moco.main, "main_lincls.py": main_lincls.main, "main_knn.py": main_knn.main}

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
