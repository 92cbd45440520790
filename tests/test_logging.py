"""common/log/progress.py: a resumed run forgets the metrics lines it will write again, and a
metrics.jsonl that holds other lines (cut by a kill, foreign, hand-edited) does not stop it."""
import json
import os
import stat

import pytest

from common.log.progress import MetricsLog


def records(*epochs) -> str:
    return "".join(json.dumps({"epoch": e, "loss": 5.0 - e}) + "\n" for e in epochs)


@pytest.fixture
def metrics(tmp_path):
    return MetricsLog(str(tmp_path))


def warnings_of(capsys):
    return [line for line in capsys.readouterr().out.splitlines() if "warning" in line]


def test_the_epochs_a_resumed_run_repeats_are_dropped_and_nothing_else(metrics, capsys):
    with open(metrics.path, "w") as f:
        f.write(records(0, 1, 2, 3))
    metrics.drop_epochs_from(2)
    assert open(metrics.path).read() == records(0, 1) and warnings_of(capsys) == []
    before = os.stat(metrics.path)
    metrics.drop_epochs_from(2)  # nothing left to drop: the file is not rewritten
    assert os.stat(metrics.path).st_ino == before.st_ino and os.listdir(os.path.dirname(metrics.path)) == [
        "metrics.jsonl"]


@pytest.mark.parametrize("line,what", [("[1, 2]", "a JSON array where an epoch record"), ("3", "a JSON number"),
                                       ('"done"', "a JSON string"), ("null", "a JSON null"),
                                       ('{"epoch": "two"}', '"epoch" is "two", not a number'),
                                       ('{"epoch": null}', '"epoch" is null, not a number'),
                                       ('{"epoch": true}', '"epoch" is true, not a number'),
                                       ('{"epoch": 1, "lo{"time": "x", "epoch": 1}', "not JSON")])
def test_a_line_that_is_no_epoch_record_is_kept_as_it_is_with_one_warning(metrics, line, what, capsys):
    with open(metrics.path, "w") as f:
        f.write(records(0, 1) + line + "\n" + records(2, 3))
    metrics.drop_epochs_from(2)
    assert open(metrics.path).read() == records(0, 1) + line + "\n"
    warned = warnings_of(capsys)
    assert len(warned) == 1 and f"{metrics.path}, line 3: {what}" in warned[0] and "kept it as it is" in warned[0]


def test_a_last_line_cut_mid_write_is_dropped_and_the_next_record_starts_on_its_own_line(metrics, capsys):
    with open(metrics.path, "wb") as f:
        # a kill mid-write, torn through a multibyte character
        f.write(records(0, 1).encode() + b'{"epoch": 2, "lo\xff\xfe')
    metrics.drop_epochs_from(2)
    assert open(metrics.path, "rb").read() == records(0, 1).encode()
    warned = warnings_of(capsys)
    assert len(warned) == 1 and f"{metrics.path}, line 3: cut off mid-write; dropped it" in warned[0]
    metrics.write({"epoch": 2, "loss": 3.0})
    assert [json.loads(line)["epoch"] for line in open(metrics.path)] == [0, 1, 2]


def test_a_last_record_that_lost_only_its_newline_is_kept_and_ended(metrics, capsys):
    with open(metrics.path, "w") as f:
        f.write(records(0) + json.dumps({"epoch": 1}))
    metrics.drop_epochs_from(2)
    metrics.write({"epoch": 2})
    assert [json.loads(line)["epoch"] for line in open(metrics.path)] == [0, 1, 2]
    assert warnings_of(capsys) == []


def test_kept_lines_stay_byte_for_byte_and_many_odd_lines_make_one_warning(metrics, tmp_path, capsys):
    odd = [b"[]", b"not json \xff", b'{"epoch": "x"}', b"7", b"{}\r"]
    with open(metrics.path, "wb") as f:
        f.write(records(0).encode() + b"".join(line + b"\n" for line in odd) + records(1).encode())
    old = os.umask(0o022)
    try:
        metrics.drop_epochs_from(1)
    finally:
        os.umask(old)
    assert open(metrics.path, "rb").read() == records(0).encode() + b"".join(line + b"\n" for line in odd)
    assert stat.S_IMODE(os.stat(metrics.path).st_mode) == 0o644 and os.listdir(tmp_path) == ["metrics.jsonl"]
    warned = warnings_of(capsys)
    assert len(warned) == 1 and "line 2:" in warned[0] and "line 4:" in warned[0]
    assert "and 1 more such line(s)" in warned[0]
