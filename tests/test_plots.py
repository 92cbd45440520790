"""plot_run.py and common/log/plots.py: a metrics.jsonl that is not one epoch record per line,
and an output that cannot be written, are one sentence; a missing folder is created."""
import json
import os
import stat

import pytest

import plot_run
from common.extras import available

needs_matplotlib = pytest.mark.skipif(not available("matplotlib"), reason="matplotlib is an optional extra")


def plot(argv, capsys):
    try:
        plot_run.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"epoch": e, "loss": 5.0 - e, "lr": 0.1} for e in range(3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run


@pytest.mark.parametrize("line,what", [("[1, 2]", "a JSON array"), ("3", "a JSON number"), ('"done"', "a JSON string"),
                                       ("null", "a JSON null"), ('{"epoch": "two"}', '"epoch" is "two"')])
def test_a_line_that_is_not_an_epoch_record_is_one_sentence_naming_file_and_line(run_dir, line, what, capsys):
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(line + "\n")
    code, err = plot([str(run_dir)], capsys)
    assert code == 2 and f"{run_dir / 'metrics.jsonl'}, line 4: {what}" in err and "Traceback" not in err, err
    assert not (run_dir / "curves.png").exists()


def test_a_line_cut_mid_write_or_undecodable_is_skipped(run_dir):
    from common.log.plots import read_metrics
    with open(run_dir / "metrics.jsonl", "ab") as f:
        f.write(b'{"epoch": 3, "lo\xff\xfe')  # a kill mid-write, torn through a multibyte character
    assert [r["epoch"] for r in read_metrics(str(run_dir))] == [0, 1, 2]


@needs_matplotlib
def test_unwritable_output_is_one_sentence_and_leaves_nothing(run_dir, read_only_dir, tmp_path, capsys):
    for output in [read_only_dir / "curves.png", read_only_dir / "sub" / "curves.png"]:
        code, err = plot([str(run_dir), "-o", str(output)], capsys)
        assert code == 2 and f"cannot write {output}" in err and "Permission" in err and "Traceback" not in err, err
        assert list(read_only_dir.iterdir()) == []
    code, err = plot([str(run_dir), "-o", str(tmp_path)], capsys)
    assert code == 2 and f"{tmp_path} is a folder" in err and "Traceback" not in err
    code, err = plot([str(run_dir), "-o", str(tmp_path / "curves.xyz")], capsys)
    assert code == 2 and "cannot write .xyz files" in err and not (tmp_path / "curves.xyz").exists()


@needs_matplotlib
def test_output_into_a_missing_folder_creates_it_with_the_umask_mode(run_dir, tmp_path, capsys):
    out = tmp_path / "figures" / "today" / "curves.png"
    old = os.umask(0o022)
    try:
        assert plot([str(run_dir), "-o", str(out)], capsys)[0] == 0
    finally:
        os.umask(old)
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.listdir(out.parent) == ["curves.png"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
