"""An optional package that is installed but fails to import (protobuf's TypeError under
tensorboard, say) is one sentence naming it, the error and the fix, and not available()."""
import sys

import pytest
from conftest import SYNTHETIC, run_main

import main_moco
from common.errors import UserError
from common.extras import available, require
from common.log.tensorboard import check_tensorboard_flag

PROTOBUF_CLASH = "Descriptors cannot be created directly.\nIf this call came from a _pb2.py file, regenerate it."


def broken_package(root, name: str, error: str = f"TypeError({PROTOBUF_CLASH!r})") -> None:
    (root / name).mkdir()
    (root / name / "__init__.py").write_text(f"raise {error}\n")


@pytest.fixture
def broken_tensorboard(tmp_path, monkeypatch):
    """`import tensorboard` raises TypeError, as with a protobuf version it does not support."""
    broken_package(tmp_path, "tensorboard")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in list(sys.modules):  # monkeypatch puts the real ones back afterwards
        if name == "tensorboard" or name.startswith(("tensorboard.", "torch.utils.tensorboard")):
            monkeypatch.delitem(sys.modules, name)


def test_a_package_that_raises_on_import_is_one_sentence_and_not_available(tmp_path, monkeypatch):
    broken_package(tmp_path, "brokenpkg")
    broken_package(tmp_path, "needs_missing", "ModuleNotFoundError('no dep', name='some_dependency')")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError) as e:
        require("brokenpkg")
    assert str(e.value) == ("brokenpkg needs the brokenpkg package, and the installed brokenpkg fails to import "
                            "(TypeError: Descriptors cannot be created directly.); reinstall it or its dependencies "
                            "(pip install -U brokenpkg)")
    # a dependency of it missing is a broken install too, not "brokenpkg is not installed"
    with pytest.raises(UserError, match=r"installed needs_missing fails to import \(ModuleNotFoundError: no dep\)"):
        require("needs_missing")
    with pytest.raises(UserError, match="needs the not_a_package package, which is not installed"):
        require("not_a_package")
    assert not available("brokenpkg") and not available("needs_missing") and not available("not_a_package")


def test_tensorboard_that_fails_to_import_is_one_sentence(broken_tensorboard):
    assert not available("tensorboard")
    with pytest.raises(UserError) as e:
        check_tensorboard_flag(True)
    assert str(e.value).startswith("--tensorboard needs the tensorboard package, and the installed tensorboard "
                                   "fails to import (TypeError: Descriptors cannot be created directly.)")
    assert "pip install -U tensorboard" in str(e.value)


def test_main_moco_with_a_broken_tensorboard_stops_before_training(broken_tensorboard, tmp_path, capsys):
    code = run_main(main_moco.main, SYNTHETIC + ["--synthetic-size", "32", "-b", "16", "--epochs", "1",
                                                 "--tensorboard", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "the installed tensorboard fails to import (TypeError" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoint_last.pth.tar").exists()
