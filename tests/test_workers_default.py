"""-j's default follows the CPU cores the process may use; an explicit -j is kept, and said
when it is more than them."""
import argparse

import pytest

import main_moco
from common.cli import groups as cli
from common.errors import UserError


def _check(workers, cores, monkeypatch):
    monkeypatch.setattr(cli, "available_cores", lambda: cores)
    args = argparse.Namespace(batch_size=16, crop_size=None, workers=workers, tensorboard=False)
    cli.check_common_flags(args)
    return args.workers


def test_default_workers_are_the_cores_at_most_eight(monkeypatch, capsys):
    assert main_moco.get_args_parser().parse_args([]).workers is None  # (filled by check_common_flags)
    assert _check(None, 2, monkeypatch) == 2  # 8 workers on 2 cores: torch warned twice, they took turns
    assert _check(None, 64, monkeypatch) == cli.DEFAULT_WORKERS
    assert capsys.readouterr().out == ""


def test_an_explicit_j_is_kept_and_said_when_it_exceeds_the_cores(monkeypatch, capsys):
    assert _check(8, 2, monkeypatch) == 8
    assert "=> -j 8 is more than the 2 CPU cores this process may use" in capsys.readouterr().out
    assert _check(2, 2, monkeypatch) == 2 and capsys.readouterr().out == ""
    with pytest.raises(UserError):
        _check(-1, 2, monkeypatch)
