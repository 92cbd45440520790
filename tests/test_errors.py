"""A refusal says why in its one sentence: the exception's own first line, not its class
name alone (common.errors.reason), whatever file was bad."""
import json

import pytest
import torch

from common.ckpt.io import load_checkpoint
from common.ckpt.pretrained import load_pretrained, torchvision_weights_path
from common.data.subsets import load_subset
from common.errors import UserError, reason


def test_reason_is_the_first_sentence_of_the_text():
    assert reason(ValueError("bad value. Try again.\nmore")) == "ValueError: bad value"
    assert reason(EOFError()) == "EOFError"  # an empty text (an empty file's EOFError) is not an IndexError
    assert reason(KeyError("indices")) == "KeyError: 'indices'"
    assert len(reason(RuntimeError("x" * 1000))) < 220
    weights_only = RuntimeError("Weights only load failed. Re-running `torch.load` with `weights_only` set to False "
                                "will likely succeed.\nWeightsUnpickler error: \n\nUnsupported operand 73\n\nCheck ...")
    assert reason(weights_only) == "RuntimeError: Unsupported operand 73"  # the cause, not torch's advice


def message(call, *args) -> str:
    with pytest.raises(UserError) as e:
        call(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_label_subset_that_is_not_json_says_why(tmp_path):
    path = tmp_path / "label_subset.json"
    path.write_text('{"indices": [1, 2')  # cut off
    assert "is not a label subset file (JSONDecodeError: Expecting" in message(load_subset, str(path), [0] * 4)
    path.write_text(json.dumps({"fraction": 0.1}))
    assert "(KeyError: 'indices')" in message(load_subset, str(path), [0] * 4)


def test_an_empty_checkpoint_is_one_sentence_not_an_index_error(tmp_path):
    empty = tmp_path / "checkpoint_last.pth.tar"
    empty.touch()  # a copy that never got its bytes
    text = message(load_checkpoint, str(empty))
    assert "cannot read checkpoint" in text and "(EOFError)" in text


def test_damaged_cached_torchvision_weights_say_why(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = torchvision_weights_path("resnet18")
    torch.save({"w": torch.zeros(3)}, tmp_path / "whole.pth")
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    with open(path, "wb") as f:
        f.write((tmp_path / "whole.pth").read_bytes()[:100])  # an interrupted download
    text = message(load_pretrained, "imagenet", "resnet18")
    assert "PytorchStreamReader failed reading zip archive" in text and "delete the file" in text
