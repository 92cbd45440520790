"""export_backbone.py's writes: foreign files, an output that is the checkpoint, unwritable or a
folder, a failed or killed write, the umask, the onnx check and a real mismatch refused."""
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, clean_env
from test_export import digest, export, ours

import hubconf
from common.errors import UserError
from common.extras import available
from common.nets.models import build_backbone
from export import formats


def test_foreign_files_are_one_sentence(tmp_path, capsys):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pth.tar")
    code, err = export([str(tmp_path / "foreign.pth.tar")], capsys)
    assert code == 2 and "is not a training checkpoint" in err and "Traceback" not in err
    torch.save({"state_dict": {"encoder.conv1.weight": torch.zeros(3)}, "arch": "resnet18"}, tmp_path / "odd.pth.tar")
    code, err = export([str(tmp_path / "odd.pth.tar")], capsys)
    assert code == 2 and "does not fit this backbone" in err and "Traceback" not in err
    # the right layout, the wrong architecture: sizes differ
    torch.save({"state_dict": {"module.encoder_q." + k: v for k, v in build_backbone("resnet18").state_dict().items()},
                "arch": "resnet34"}, tmp_path / "odd.pth.tar")
    code, err = export([str(tmp_path / "odd.pth.tar")], capsys)
    assert code == 2 and "does not fit this backbone" in err and "Traceback" not in err


needs_onnx = pytest.mark.skipif(not (available("onnx") and available("onnxscript") and available("onnxruntime")),
                                reason="onnx, onnxscript and onnxruntime are optional (requirements-extra.txt)")


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_output_that_is_the_checkpoint_is_refused_under_every_spelling(checkpoints, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    ckpt = run / "checkpoint_last.pth.tar"
    shutil.copy(checkpoints["moco"], ckpt)
    os.link(ckpt, run / "checkpoint_0002.pth.tar")  # what main_moco.py's epoch files are
    os.symlink(ckpt, run / "latest.pth.tar")
    before, names = digest(ckpt), sorted(os.listdir(run))
    monkeypatch.chdir(tmp_path)
    for output in [str(ckpt), "run/checkpoint_last.pth.tar", "./run/../run//checkpoint_last.pth.tar",
                   "run/checkpoint_0002.pth.tar", "run/latest.pth.tar"]:
        for fmt in ["torchvision", "torchscript"]:
            code, err = export(["run/checkpoint_last.pth.tar", "--format", fmt, "-o", output], capsys)
            assert code == 2 and "would overwrite the checkpoint" in err and "pass another -o" in err, (output, err)
            assert "Traceback" not in err
    assert digest(ckpt) == before and sorted(os.listdir(run)) == names
    assert torch.load(ckpt, weights_only=True)["state_dict"]  # still a training checkpoint


@pytest.mark.parametrize("fmt", list(formats.FORMATS))
def test_unwritable_or_folder_output_is_one_sentence_and_leaves_nothing(checkpoints, fmt, read_only_dir, tmp_path,
                                                                       capsys):
    for output in [read_only_dir / "b.out", read_only_dir / "sub" / "b.out"]:
        code, err = export([checkpoints["moco"], "--format", fmt, "-o", str(output)], capsys)
        assert code == 2 and f"cannot write {output}" in err and "Permission" in err, err
        assert "Traceback" not in err and list(read_only_dir.iterdir()) == []
    folder = tmp_path / "exports"
    folder.mkdir()
    code, err = export([checkpoints["moco"], "--format", fmt, "-o", str(folder)], capsys)
    assert code == 2 and f"{folder} is a folder; pass -o a file name" in err and "Traceback" not in err
    assert list(folder.iterdir()) == []


@pytest.mark.slow
def test_a_failed_write_leaves_the_earlier_export_whole(checkpoints, tmp_path, capsys, monkeypatch):
    out = tmp_path / "b.pth"
    assert export([checkpoints["moco"], "-o", str(out)])[0] == 0
    before = {p.name: digest(p) for p in tmp_path.iterdir()}

    def disk_full(fmt, model, data, example, tmp):
        open(tmp, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(formats, "write", disk_full)
    code, err = export([checkpoints["simclr"], "-o", str(out)], capsys)
    assert code == 2 and "No space left on device" in err and "nothing was written" in err and "Traceback" not in err
    assert {p.name: digest(p) for p in tmp_path.iterdir()} == before  # no temporary file either


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_exports_beside_each_other_keep_one_json_each(checkpoints, tmp_path):
    ckpt = shutil.copy(checkpoints["simclr"], tmp_path / "simclr.pth.tar")
    for fmt in ["torchvision", "torchscript"]:
        assert export([str(ckpt), "--format", fmt])[0] == 0  # the default names, beside the checkpoint
    stem = str(tmp_path / "simclr_backbone")
    pth = [p for p in os.listdir(tmp_path) if p.endswith(".pth")]
    assert len(pth) == 1 and pth[0].startswith("simclr_backbone-")
    for fmt, file in [("torchvision", str(tmp_path / pth[0])), ("torchscript", stem + ".pt")]:
        info = json.load(open(file + ".json"))
        assert info["format"] == fmt and info["file"] == os.path.abspath(file) and info["sha256"] == digest(file)
    assert not os.path.exists(stem + ".json")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchvision", "torchscript"])
def test_exported_files_get_the_umask_mode(checkpoints, fmt, tmp_path, umask_022):
    out = tmp_path / ("b" + formats.FORMATS[fmt])
    assert export([checkpoints["moco"], "--format", fmt, "-o", str(out)])[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name, out.name + ".json"]  # no temporary file left
    for p in tmp_path.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


@pytest.mark.slow
@needs_onnx
def test_onnx_export_of_trained_checkpoints_passes_its_check(moco_pretrained, tmp_path, capsys, umask_022):
    # a longer run's features reach ~100: fp32 differences then exceed any fixed 1e-5
    ckpt = torch.load(moco_pretrained, map_location="cpu", weights_only=False)
    state = dict(ckpt["state_dict"])
    for name in ["weight", "bias"]:
        state[f"module.encoder_q.layer4.1.bn2.{name}"] = state[f"module.encoder_q.layer4.1.bn2.{name}"] * 40
    scaled = tmp_path / "scaled.pth.tar"
    torch.save({"state_dict": state, **{k: ckpt[k] for k in ["arch", "method", "args"]}}, scaled)
    torch.manual_seed(0)
    with torch.no_grad():
        assert ours(str(scaled), small=False)(torch.randn(4, 3, 32, 32)).abs().max() > 50
    for path, out in [(moco_pretrained, tmp_path / "trained.onnx"), (str(scaled), tmp_path / "scaled.onnx")]:
        capsys.readouterr()
        code = export([path, "--format", "onnx", "-o", str(out)])[0]
        log = capsys.readouterr()
        assert code == 0, log.err
        assert "matches on a random batch (max difference" in log.out and "of the largest feature" in log.out
        info = json.load(open(str(out) + ".json"))
        assert info["max_rel_difference"] <= formats.RTOL and info["max_abs_difference"] >= 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
        assert stat.S_IMODE(os.stat(str(out) + ".json").st_mode) == 0o644


@pytest.mark.slow
def test_a_real_mismatch_is_still_refused(checkpoints, tmp_path, capsys, monkeypatch):
    features = torch.full((3, 512), 107.0)
    assert formats.matches(features + 7.25e-5, features)[0]  # fp32 reordering at a trained scale
    assert not formats.matches(features * 1.001, features)[0]
    assert not formats.matches(torch.full((3, 512), 1e-3), torch.zeros(3, 512))[0]
    real = formats.exported_forward
    monkeypatch.setattr(formats, "exported_forward",
                        lambda *a: (lambda x, f=real(*a): f(x) * 1.001))  # off by 1e-3 of the features
    code, err = export([checkpoints["moco"], "-o", str(tmp_path / "b.pth")], capsys)
    assert code == 2 and "does not reproduce the backbone's features" in err and "of the largest feature" in err
    assert "nothing was written" in err and list(tmp_path.iterdir()) == []


KILLED_EXPORT = """
import os, signal, sys
import export_backbone
from export import formats
where, checkpoint, out = sys.argv[1:]
if where == "mid-write":  # half the file on disk
    def write(fmt, model, data, example, tmp):
        open(tmp, "wb").write(data[:len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    formats.write = write
else:  # the export renamed into place, its JSON not yet
    replace = os.replace
    def replace_then_die(src, dst):
        if dst.endswith(".json"):
            os.kill(os.getpid(), signal.SIGKILL)
        replace(src, dst)
    os.replace = replace_then_die
export_backbone.main([checkpoint, "-o", out])
"""


@pytest.mark.slow
@pytest.mark.parametrize("where", ["mid-write", "between-the-two-renames"])
def test_a_killed_export_leaves_the_earlier_one_or_a_refusal_never_a_wrong_backbone(checkpoints, where, tmp_path):
    out = tmp_path / "b.pth"
    assert export([checkpoints["moco"], "-o", str(out)])[0] == 0
    before = {p.name: digest(p) for p in tmp_path.iterdir()}
    killed = subprocess.run([sys.executable, "-c", KILLED_EXPORT, where, checkpoints["simclr"], str(out)], cwd=ROOT,
                            env=clean_env(), capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = {p.name: digest(p) for p in tmp_path.iterdir()}
    # what a kill leaves behind are dot-files: no loader's *.pth pattern takes them for an export
    assert all(name.startswith(".") for name in left.keys() - before.keys()), left
    if where == "mid-write":
        assert {name: left[name] for name in before} == before
        assert hubconf.backbone(str(tmp_path)).meta["sha256"] == before["b.pth"]  # the earlier export
    else:  # the new weights beside the earlier JSON: refused, not loaded with another export's description
        assert left["b.pth"] != before["b.pth"] and left["b.pth.json"] == before["b.pth.json"]
        with pytest.raises(UserError, match="is not the file its JSON b.pth.json describes") as e:
            hubconf.backbone(str(out))
        assert "\n" not in str(e.value)
