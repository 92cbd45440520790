"""--init imagenet|PATH in the pretraining scripts: the first step starts from the file's
weights (both MoCo encoders), problems are one sentence, --resume ignores it."""
import argparse
import json

import pytest
import torch
from conftest import SYNTHETIC, run_inline, run_main

import main_byol
import main_distill
import main_inpaint
import main_moco
import main_moco_v3
import main_simclr
from common.ckpt.init_weights import init_backbone
from common.ckpt.pretrained import torchvision_weights_path
from common.errors import UserError
from common.nets.models import build_backbone
from common.train.run import PretrainRun

TINY = SYNTHETIC + ["--synthetic-size", "32", "-b", "16", "--epochs", "1", "--seed", "3", "-p", "100", "--no-payoff"]
SCRIPTS = {  # script, its tiny flags, the backbones --init must reach (attribute names on the model)
    "moco": (main_moco, ["--moco-k", "32", "--moco-dim", "16", "--mlp", "--bn-splits", "2"],
             ("encoder_q", "encoder_k")),
    "moco_v3": (main_moco_v3, ["--moco-dim", "16", "--moco-mlp-dim", "32"], ("base_encoder", "momentum_encoder")),
    "simclr": (main_simclr, [], ("encoder",)),
    "byol": (main_byol, ["--proj-dim", "16", "--proj-hidden-dim", "32", "--pred-hidden-dim", "32"],
             ("encoder", "target_encoder")),
    "inpaint": (main_inpaint, ["--patches", "2", "--patch-size", "8"], ("encoder",)),
    # the student; its teacher: an export (teacher_export), written per test
    "distill": (main_distill, ["--queue-size", "32", "--proj-hidden-dim", "32"], ("encoder",)),
}


class FirstStep(Exception):
    """Raised in place of the first epoch, once the weights it would start from are copied."""


def capture_first_step(monkeypatch, script):
    """Replace the script's train_one_epoch: keep a copy of the model's weights as the first
    step would see them (after --init and --resume), then stop the run. The view check
    before it (seconds, unrelated to the weights) is skipped."""
    seen = {}
    monkeypatch.setattr(PretrainRun, "check_views", lambda self, recipe: None)

    def first_epoch(model, *args, **kwargs):
        seen.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        raise FirstStep

    monkeypatch.setattr(script, "train_one_epoch", first_epoch)
    return seen


def teacher_export(folder) -> str:
    """A resnet18 teacher for main_distill.py: an export_backbone.py-style file (weights + JSON
    sidecar) of other weights than the init file's, so that the student's start is told apart."""
    path = str(folder / "teacher.pth")
    init_file(path, seed=7)
    with open(path + ".json", "w") as f:
        json.dump({"arch": "resnet18", "small_images": False, "crop_size": 32}, f)
    return path


def init_file(path, arch="resnet18", seed=123):
    """A torchvision state_dict (1000-class fc included) with visible BatchNorm statistics."""
    torch.manual_seed(seed)
    net = build_backbone(arch)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
    torch.save(net.state_dict(), path)
    return {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCRIPTS))
def test_first_step_starts_from_the_init_file(name, tmp_path, monkeypatch, capsys):
    script, extra, encoders = SCRIPTS[name]
    if script is main_distill:
        extra = extra + ["--teacher", teacher_export(tmp_path)]
    expected = init_file(tmp_path / "init.pth")
    seen = capture_first_step(monkeypatch, script)
    with pytest.raises(FirstStep):
        run_main(script.main, TINY + extra + ["--init", str(tmp_path / "init.pth"), "--output-dir", str(tmp_path / "o")])
    assert "=> --init: the backbone starts from" in capsys.readouterr().out
    for enc in encoders:
        for k, v in expected.items():
            assert torch.equal(seen[f"{enc}.{k}"], v), (enc, k)  # weights and BatchNorm statistics


@pytest.mark.slow
def test_init_accepts_an_export_and_a_checkpoint_and_resume_ignores_it(tmp_path, monkeypatch, capsys):
    expected = init_file(tmp_path / "exported.pth")
    with open(tmp_path / "exported.pth.json", "w") as f:  # export_backbone.py's sidecar
        json.dump({"arch": "resnet18", "small_images": False}, f)
    run = TINY + ["--init", str(tmp_path / "exported.pth"), "--output-dir", str(tmp_path / "run")]
    run_inline(capsys, main_simclr.main, run)  # one real epoch: its checkpoint stores --init
    ckpt = torch.load(tmp_path / "run" / "checkpoint_last.pth.tar", map_location="cpu", weights_only=True)
    assert ckpt["args"]["init"] == str(tmp_path / "exported.pth")
    assert not torch.equal(ckpt["state_dict"]["module.encoder.conv1.weight"], expected["conv1.weight"])  # it trained

    # --resume: the checkpoint's weights, not the init file's, with a line saying so
    seen = capture_first_step(monkeypatch, main_simclr)
    with pytest.raises(FirstStep):
        run_main(main_simclr.main, run[:-2] + ["--epochs", "2", "--output-dir", str(tmp_path / "run"),
                                              "--resume", "auto"])
    assert "is ignored" in capsys.readouterr().out
    assert all(torch.equal(seen[k[len("module."):]], v) for k, v in ckpt["state_dict"].items())

    # a pretraining checkpoint of ours as --init (continued pretraining from an earlier run)
    net = build_backbone("resnet18")
    init_backbone(init_args(tmp_path, str(tmp_path / "run" / "checkpoint_last.pth.tar")), net)
    assert torch.equal(net.layer4[1].conv2.weight, ckpt["state_dict"]["module.encoder.layer4.1.conv2.weight"])


def init_args(tmp_path, init, arch="resnet18"):
    """What init_backbone reads of a fresh run's flags."""
    return argparse.Namespace(init=init, arch=arch, resume="", output_dir=str(tmp_path / "fresh"))


def test_imagenet_comes_only_from_the_hub_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = torchvision_weights_path("resnet18")
    argv = TINY + ["--init", "imagenet", "--output-dir", str(tmp_path / "o")]
    proc = run_inline(capsys, main_simclr.main, argv, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert repr(path) in proc.stderr and "nothing is downloaded" in proc.stderr  # names the file and its folder
    assert len(proc.stderr.strip().splitlines()) == 1
    expected = init_file(tmp_path / "w.pth")  # stands in for torchvision's cached file
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "w.pth").rename(path)
    net = build_backbone("resnet18")
    init_backbone(init_args(tmp_path, "imagenet"), net)
    assert torch.equal(net.layer1[0].bn1.running_mean, expected["layer1.0.bn1.running_mean"])


@pytest.mark.parametrize("how", ["checkpoint", "state_dict", "missing"])
def test_mismatch_is_one_sentence(how, tmp_path):
    init = tmp_path / "init.pth"
    if how == "checkpoint":  # says its arch: named
        torch.save({"arch": "resnet34", "state_dict": {"module.encoder." + k: v for k, v in
                                                       build_backbone("resnet34").state_dict().items()}}, init)
        message = "holds a resnet34 but -a/--arch is resnet18"
    elif how == "state_dict":  # a bare state_dict: the shapes tell
        torch.save(build_backbone("resnet34").state_dict(), init)
        message = "does not fit this backbone"
    else:
        message = "does not exist"
    with pytest.raises(UserError) as e:
        init_backbone(init_args(tmp_path, str(init)), build_backbone("resnet18"))
    assert message in str(e.value) and "\n" not in str(e.value) and str(e.value).count(". ") == 0


def test_a_folder_names_the_file_it_likely_meant(tmp_path):
    run = tmp_path / "run"
    (run / "exported").mkdir(parents=True)

    def refusal(folder):
        with pytest.raises(UserError) as e:
            init_backbone(init_args(tmp_path, str(folder)), build_backbone("resnet18"))
        message = str(e.value)
        assert "is a folder" in message and "does not exist" not in message and "\n" not in message, message
        return message

    assert "a checkpoint, exported backbone" in refusal(run)  # nothing in it to suggest
    (run / "exported" / "b.pth").touch()
    (run / "exported" / "b.pth.json").touch()
    assert repr(str(run / "exported" / "b.pth")) in refusal(run)
    assert repr(str(run / "exported" / "b.pth")) in refusal(run / "exported")
    (run / "checkpoint_last.pth.tar").touch()  # the run's own checkpoint comes first
    assert repr(str(run / "checkpoint_last.pth.tar")) in refusal(run)


def test_an_unreadable_file_says_why(tmp_path):
    init = tmp_path / "init.pth"
    init.write_bytes(b"PK\x03\x04" + bytes(60))  # a zip header, then nothing: a cut-off download
    with pytest.raises(UserError) as e:
        init_backbone(init_args(tmp_path, str(init)), build_backbone("resnet18"))
    message = str(e.value)
    assert "RuntimeError: PytorchStreamReader failed reading zip archive" in message, message
    assert "damaged" in message and "\n" not in message and "This is an internal miniz error" not in message
