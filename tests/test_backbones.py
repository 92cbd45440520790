"""Every torchvision classification family as a backbone (common/nets/backbones.py): build,
feature width, 32 px forward with the small-image stem, BatchNorm or not, and the scripts
(MoCo, SimCLR, logreg probe, export) on a non-ResNet family."""
import functools
import json

import pytest
import torch
import torch.nn as nn
from conftest import run_inline

import export_backbone
import main_lincls
import main_moco
import main_simclr
from common.errors import UserError
from common.nets.backbones import Backbone, block_names
from common.nets.models import build_backbone, feature_dim, has_batchnorm, without_head
from moco.split_bn import SplitBatchNorm

FAMILIES = {  # arch: (feature width, has BatchNorm, wrapped in Backbone)
    "resnet18": (512, True, False),
    "regnet_y_400mf": (440, True, False),
    "mobilenet_v3_small": (1024, True, True),
    "efficientnet_b0": (1280, True, True),
    "vit_tiny": (64, False, True),
    "convnext_tiny": (768, False, True),
    "swin_t": (768, False, True),
}
SLOW = ("efficientnet_b0", "convnext_tiny", "swin_t")


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a in SLOW else a for a in FAMILIES])
def test_family_builds_with_its_width_and_runs_at_32px(arch):
    width, bn, wrapped = FAMILIES[arch]
    torch.manual_seed(0)
    net = build_backbone(arch, num_classes=7, small_images=True)
    assert isinstance(net, Backbone) == wrapped and isinstance(net.fc, nn.Linear)
    assert feature_dim(net) == width and has_batchnorm(net) == bn
    x = torch.randn(2, 3, 32, 32)
    assert net(x).shape == (2, 7)
    with without_head(net):
        assert net(x).shape == (2, width)


def test_resnet_keys_unchanged_and_split_bn_replaces_every_batchnorm():
    net = build_backbone("resnet18", small_images=True)
    assert "conv1.weight" in net.state_dict() and "fc.weight" in net.state_dict()
    mobile = build_backbone("mobilenet_v3_small", num_classes=5, norm_layer=functools.partial(SplitBatchNorm,
                                                                                               num_splits=2))
    norms = [m for m in mobile.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(isinstance(m, SplitBatchNorm) for m in norms)
    assert norms[0].eps == 1e-3  # torchvision's MobileNetV3 BatchNorm settings kept
    assert all(k.startswith(("body.", "fc.")) for k in mobile.state_dict())


def test_a_family_without_a_small_image_stem_is_one_sentence():
    with pytest.raises(UserError, match="no small-image stem for the VGG family.*--no-small-images"):
        build_backbone("vgg11", small_images=True)


def test_inpainting_needs_a_resnet_in_one_sentence():
    from inpaint.model import ContextEncoder
    with pytest.raises(UserError, match="main_inpaint.py decodes a ResNet's layer4 feature map.*VisionTransformer"):
        ContextEncoder(functools.partial(build_backbone, "vit_tiny"))


def test_vit_takes_other_sides_than_it_was_built_for():
    net = build_backbone("vit_tiny", num_classes=3)
    assert net(torch.randn(1, 3, 48, 48)).shape == (1, 3)


def test_block_names_per_family():
    assert block_names(build_backbone("resnet18")) == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    vit = block_names(build_backbone("vit_tiny"))
    assert "encoder.layers.encoder_layer_1" in vit and "conv_proj" in vit
    assert "features.12" in block_names(build_backbone("mobilenet_v3_small"))


SYN = ["--dataset", "synthetic", "--synthetic-size", "64", "-j", "0", "--seed", "3", "-p", "2", "--epochs", "1",
       "--small-images", "--crop-size", "32"]


@pytest.mark.parametrize("arch", [pytest.param("mobilenet_v3_small", marks=pytest.mark.slow), "vit_tiny"])
def test_moco_and_simclr_step(arch, tmp_path, capsys):
    out = run_inline(capsys, main_moco.main, SYN + ["-a", arch, "-b", "16", "--moco-k", "32", "--moco-dim", "16",
                                                    "--mlp", "--aug-plus", "--bn-splits", "2",
                                                    "--output-dir", str(tmp_path / "moco")]).stdout
    no_bn = "has no BatchNorm: shuffle-BN (--bn-splits) is not needed and is off" in out
    assert no_bn == (arch == "vit_tiny")
    ckpt = torch.load(tmp_path / "moco" / "checkpoint_last.pth.tar", map_location="cpu", weights_only=True)
    assert any(k.startswith("module.encoder_q.body.") for k in ckpt["state_dict"])
    run_inline(capsys, main_simclr.main, SYN + ["-a", arch, "-b", "16", "--proj-dim", "16",
                                                "--output-dir", str(tmp_path / "simclr")])
    assert (tmp_path / "simclr" / "checkpoint_last.pth.tar").is_file()


@pytest.fixture(scope="module")
def vit_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("vit_moco")
    main_moco.main(SYN + ["-a", "vit_tiny", "-b", "16", "--moco-k", "32", "--moco-dim", "16", "--mlp",
                          "--output-dir", str(out)])
    return str(out / "checkpoint_last.pth.tar")


def test_logreg_probe_and_torchvision_export_of_a_vit(vit_checkpoint, tmp_path, capsys):
    run_inline(capsys, main_lincls.main, ["--dataset", "synthetic", "--synthetic-size", "64", "-j", "0", "-b", "16",
                                          "--probe", "logreg", "--pretrained", vit_checkpoint,
                                          "--output-dir", str(tmp_path / "probe")])
    out = tmp_path / "backbone.pth"
    run_inline(capsys, export_backbone.main, [vit_checkpoint, "-o", str(out)])
    info = json.load(open(str(out) + ".json"))
    assert (info["arch"], info["family"], info["feature_dim"]) == ("vit_tiny", "VisionTransformer", 64)
    net = build_backbone("vit_tiny", small_images=info["small_images"])
    net.fc = nn.Identity()
    net.load_state_dict(torch.load(out, weights_only=True), strict=True)
    state = torch.load(vit_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    ours = build_backbone("vit_tiny", small_images=info["small_images"])
    ours.load_state_dict({k[len("module.encoder_q."):]: v for k, v in state.items()
                          if k.startswith("module.encoder_q.") and not k.startswith("module.encoder_q.fc.")},
                         strict=False)
    ours.fc = nn.Identity()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), ours.eval()(x))


def test_torchscript_export_of_a_vit_matches(vit_checkpoint, tmp_path, capsys):
    out = run_inline(capsys, export_backbone.main, [vit_checkpoint, "--format", "torchscript",
                                                    "-o", str(tmp_path / "b.pt")]).stdout
    assert "matches on a random batch" in out


def test_wrong_trainable_layer_lists_the_family_blocks(vit_checkpoint, tmp_path, capsys):
    ran = run_inline(capsys, main_lincls.main, ["--dataset", "synthetic", "--synthetic-size", "64", "-j", "0",
                                                "-b", "16", "--epochs", "1", "--pretrained", vit_checkpoint,
                                                "--trainable-layers", "layer4",
                                                "--output-dir", str(tmp_path / "probe")], check=False)
    assert ran.returncode != 0
    assert "'layer4', which is not a block of vit_tiny" in ran.stderr + ran.stdout
    assert "encoder.layers.encoder_layer_1" in ran.stderr + ran.stdout
