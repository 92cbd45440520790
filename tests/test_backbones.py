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
from moco.builder import MoCo
from moco.split_bn import SplitBatchNorm
from simclr.builder import SimCLR

FAMILIES = {  # arch: (feature width, has BatchNorm, wrapped in Backbone)
    "resnet18": (512, True, False),
    "regnet_y_400mf": (440, True, False),
    "mobilenet_v3_small": (1024, True, True),
    "efficientnet_b0": (1280, True, True),
    "vit_tiny": (64, False, True),
    "convnext_tiny": (768, False, True),
    "swin_t": (768, False, True),
    "densenet121": (1024, True, True),
    "convnext_micro": (256, False, True),
}
SLOW = ("efficientnet_b0", "convnext_tiny", "swin_t", "densenet121")
# each family's smallest member (ConvNeXt: narrower than torchvision's smallest)
SMALLEST = ("resnet18", "regnet_y_400mf", "mobilenet_v3_small", "efficientnet_b0", "vit_tiny", "convnext_micro",
            "swin_t", "densenet121")


def per_family(archs=tuple(FAMILIES), slow=SLOW):
    return [pytest.param(a, marks=pytest.mark.slow) if a in slow else a for a in archs]


@pytest.mark.parametrize("arch", per_family())
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


def test_a_family_without_a_feature_map_for_inpainting_is_one_sentence():
    from inpaint.model import ContextEncoder
    with pytest.raises(UserError, match="main_inpaint.py decodes the backbone's last feature map, which the "
                                        "ShuffleNetV2 family has no single one of here; pick .*ConvNeXt"):
        ContextEncoder(functools.partial(build_backbone, "shufflenet_v2_x0_5"))


@pytest.mark.parametrize("arch", per_family(SMALLEST, SLOW + ("resnet18", "regnet_y_400mf")))
def test_one_moco_v2_and_one_simclr_step_per_family(arch):
    """The builders on each family's smallest member at 32 px with its small-image stem
    (SplitBatchNorm where it has BatchNorm): the loss reaches every tensor and the step
    moves the encoder from stem to head."""
    torch.manual_seed(0)
    norm = functools.partial(SplitBatchNorm, num_splits=2) if FAMILIES[arch][1] else None
    moco = MoCo(functools.partial(build_backbone, arch, small_images=True, norm_layer=norm), dim=16, K=8, m=0.9,
                T=0.2, mlp=True)
    assert any(isinstance(m, SplitBatchNorm) for m in moco.modules()) == FAMILIES[arch][1]
    simclr = SimCLR(functools.partial(build_backbone, arch, small_images=True), proj_dim=16)
    for model, encoder, n in ((moco, moco.encoder_q, 4), (simclr, simclr.encoder, 2)):  # 2 BN groups of 2; 2 x 2 views
        x1, x2 = torch.rand(n, 3, 32, 32), torch.rand(n, 3, 32, 32)
        before = {k: v.clone() for k, v in encoder.state_dict().items()}
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        loss, stats = model(x1, x2)
        assert torch.isfinite(loss) and 0 <= stats["acc1"] <= 100
        loss.backward()
        no_grad = [n for n, p in encoder.named_parameters()  # the backbone's (a bias before BN gets none)
                   if not n.startswith("fc.") and (p.grad is None or not p.grad.abs().sum() > 0)]
        assert not no_grad, no_grad
        optimizer.step()
        params = [n for n, _ in encoder.named_parameters() if not n.startswith("fc.")]
        for name in (params[0], params[-1]):  # the stem's first tensor and the last block's last
            assert not torch.equal(encoder.state_dict()[name], before[name]), name
    assert all(not p.requires_grad for p in moco.encoder_k.parameters())  # it follows by momentum only


def test_mnasnet_loads_the_plain_dict_a_checkpoint_holds():
    """torchvision's MNASNet wants its layout version in the state_dict's metadata, which the
    backbone extracted from a checkpoint has not."""
    net = build_backbone("mnasnet0_5", num_classes=3, small_images=True)
    plain = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    other = build_backbone("mnasnet0_5", num_classes=3, small_images=True)
    other.load_state_dict(plain, strict=True)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in plain.items())


def test_vit_takes_other_sides_than_it_was_built_for():
    net = build_backbone("vit_tiny", num_classes=3)
    assert net(torch.randn(1, 3, 48, 48)).shape == (1, 3)


def test_block_names_per_family():
    assert block_names(build_backbone("resnet18")) == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    vit = block_names(build_backbone("vit_tiny"))
    assert "encoder.layers.encoder_layer_1" in vit and "conv_proj" in vit
    assert "features.12" in block_names(build_backbone("mobilenet_v3_small"))


SYN = ["--dataset", "synthetic", "--synthetic-size", "64", "-j", "0", "--seed", "3", "-p", "2", "--epochs", "1",
       "--small-images", "--crop-size", "32", "--no-payoff"]


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


@pytest.mark.slow
def test_moco_resume_of_a_mobilenet_equals_the_uninterrupted_run(tmp_path, capsys):
    """SplitBatchNorm statistics, the key encoder and the queue of a wrapped BatchNorm family
    come back exactly: 2 epochs straight equal 1 epoch + --resume auto to 2."""
    argv = ["--dataset", "synthetic", "--synthetic-size", "16", "-j", "0", "--seed", "3", "-a", "mobilenet_v3_small",
            "--small-images", "--crop-size", "32", "-b", "8", "--moco-k", "16", "--moco-dim", "16", "--mlp",
            "--bn-splits", "2", "--schedule", "1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_inline(capsys, main_moco.main, argv + ["--epochs", "2", "--output-dir", str(straight)])
    run_inline(capsys, main_moco.main, argv + ["--epochs", "1", "--output-dir", str(split)])
    assert "resumed" in run_inline(capsys, main_moco.main, argv + ["--epochs", "2", "--output-dir", str(split),
                                                                   "--resume", "auto"]).stdout
    a, b = (torch.load(d / "checkpoint_last.pth.tar", map_location="cpu", weights_only=True)["state_dict"]
            for d in (straight, split))
    assert set(a) == set(b) and any(".running_mean" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


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


# ---------------------------------------------------------------- a ConvNeXt through every script

CONVNEXT = ["--dataset", "synthetic", "--synthetic-size", "32", "-j", "0", "--seed", "3", "-a", "convnext_micro",
            "--small-images", "--crop-size", "32", "-b", "8"]


def our_backbone(checkpoint: str) -> nn.Module:
    """The checkpoint's backbone as this repository builds and loads it, head off."""
    from common.ckpt.pretrained import load_backbone
    net = build_backbone("convnext_micro", small_images=True)
    load_backbone(net, torch.load(checkpoint, map_location="cpu", weights_only=True))
    net.fc = nn.Identity()
    return net.eval()


@pytest.fixture(scope="module")
def convnext_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("convnext_moco")
    main_moco.main(CONVNEXT + ["--epochs", "1", "-p", "2", "--moco-k", "16", "--moco-dim", "16", "--mlp", "--aug-plus",
                               "--output-dir", str(out)])
    return str(out / "checkpoint_last.pth.tar")


@pytest.mark.slow
def test_a_convnext_pretrains_probes_knns_and_exports_in_every_format_with_its_features(convnext_checkpoint,
                                                                                          tmp_path, capsys):
    import numpy as np
    import onnxruntime

    import main_knn
    from common.eval.inputs import eval_splits, eval_view
    ckpt = convnext_checkpoint
    probe = run_inline(capsys, main_lincls.main, CONVNEXT + ["--probe", "logreg", "--pretrained", ckpt,
                                                             "--output-dir", str(tmp_path / "probe")]).stdout
    assert "logistic-regression probe" in probe
    result = json.load(open(tmp_path / "probe" / "results.json"))
    assert (result["arch"], result["probe"], result["num_train_images"]) == ("convnext_micro", "logreg", 32)
    tuned = run_inline(capsys, main_lincls.main, CONVNEXT + ["--finetune", "--epochs", "1", "--pretrained", ckpt,
                                                             "--output-dir", str(tmp_path / "finetune")]).stdout
    assert "fine-tuning everything" in tuned
    state = torch.load(tmp_path / "finetune" / "checkpoint_last.pth.tar", map_location="cpu",
                       weights_only=True)["state_dict"]
    assert not torch.equal(state["module.body.features.0.0.weight"], our_backbone(ckpt).body.features[0][0].weight)

    # kNN: its embeddings are the checkpoint's backbone features (L2-normalised) of the val images
    knn_argv = CONVNEXT + ["--pretrained", ckpt, "--export-embeddings", "--knn-k", "5",
                           "--output-dir", str(tmp_path / "knn")]
    assert "top-1" in run_inline(capsys, main_knn.main, knn_argv).stdout
    # the same flags into another folder: main_knn.py refuses the one that now holds the evaluation
    knn_args = main_knn.finalize_args(main_knn.get_args_parser().parse_args(knn_argv + ["--output-dir",
                                                                                     str(tmp_path / "knn_args")]))
    val = eval_view(eval_splits(knn_args, None).val, knn_args)
    images = torch.stack([val[i][0] for i in range(len(val))])
    ours = our_backbone(ckpt)
    with torch.no_grad():
        feats = ours(images)
    exported = np.load(tmp_path / "knn" / "embeddings" / "val_features.npy").astype(np.float32)
    np.testing.assert_allclose(exported, torch.nn.functional.normalize(feats, dim=1).numpy(), atol=2e-3)

    # export: each format, read back as a user would, gives our features
    for fmt, ext in (("torchvision", ".pth"), ("torchscript", ".pt"), ("onnx", ".onnx")):
        out = tmp_path / f"backbone{ext}"
        ran = run_inline(capsys, export_backbone.main, [ckpt, "--format", fmt, "-o", str(out)]).stdout
        assert "matches on a random batch" in ran
        info = json.load(open(str(out) + ".json"))
        assert (info["arch"], info["family"], info["small_images"], info["feature_dim"]) == \
            ("convnext_micro", "ConvNeXt", True, 256)
        if fmt == "torchvision":
            net = build_backbone(info["arch"], small_images=info["small_images"])
            net.fc = nn.Identity()
            net.load_state_dict(torch.load(out, weights_only=True), strict=True)
            with torch.no_grad():
                theirs = net.eval()(images)
        elif fmt == "torchscript":
            with torch.no_grad():
                theirs = torch.jit.load(str(out))(images)
        else:
            session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            theirs = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
        torch.testing.assert_close(theirs, feats, atol=1e-4, rtol=1e-4)


def test_throughput_bench_has_one_row_per_family(tmp_path, capsys):
    from bench import throughput
    record = throughput.main(["--families", "vit_tiny", "mobilenet_v3_small", "--methods", "moco", "--crop-size", "32",
                              "-b", "4", "--moco-k", "8", "--device", "cpu", "--steps", "1", "--repeats", "1",
                              "--json", str(tmp_path / "t.json")])
    moco = record["results"]["moco"]
    assert list(moco) == ["vit_tiny", "mobilenet_v3_small"] and moco["vit_tiny"]["speedup_vs_baseline"] == 1.0
    for arch, rec in moco.items():
        net = build_backbone(arch, small_images=True)
        assert rec["backbone_parameters"] == sum(p.numel() for n, p in net.named_parameters() if not n.startswith("fc."))
        assert rec["images_per_s"] > 0
    rows = [line for line in record["table"].splitlines() if line.startswith("| ") and "images/s" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["VisionTransformer", "MobileNetV3"]
    assert json.load(open(tmp_path / "t.json"))["table"] == record["table"]
