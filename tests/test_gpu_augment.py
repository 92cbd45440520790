"""--gpu-augment: the batched photometric ops against torchvision's functional ops, the
recipe's probabilities, per-sample seeding, and the split (channels-last) BatchNorm."""
import copy
import dataclasses
import functools

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from common.augment import gpu as G
from common.augment import gpu_decode as D
from common.augment import transforms as augment
from common.augment.asymmetric import byol_views
from common.data.images import FileListDataset, pil_loader
from common.data.transformed import TransformedDataset
from common.nets.models import build_backbone
from moco.augment import moco_v1, moco_v2
from moco.split_bn import SplitBatchNorm, _group_batch_norm_ops
from simclr.augment import simclr_augmentation

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ONE_LEVEL = 1 / 255 + 1e-6


def photo(n=4, size=40, seed=0) -> torch.Tensor:
    """uint8 images with smooth colour gradients and edges (hue, saturation and blur all matter)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (n, 3, size // 8, size // 8), generator=g, dtype=torch.uint8)
    x = torch.nn.functional.interpolate(small.float(), size=(size, size), mode="bilinear", align_corners=False)
    x[:, :, size // 3:size // 2] = 255 - x[:, :, size // 3:size // 2]
    return x.round().clamp(0, 255).to(torch.uint8)


def params_for(n, **values) -> torch.Tensor:
    """Parameter vectors with every op off and identity factors, then `values` set."""
    p = torch.zeros(n, G.NUM_PARAMS)
    p[:, G.BRIGHTNESS:G.SATURATION + 1] = 1.0
    p[:, G.ORDER] = torch.arange(4).float()
    p[:, G.SIGMA] = 1.0
    for k, v in values.items():
        col = getattr(G, k.upper())
        p[:, col] = torch.as_tensor(v, dtype=torch.float32)
    return p


SPEC = moco_v2(40).spec()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,factor", [("brightness", 1.3), ("brightness", 0.6), ("contrast", 1.4), ("contrast", 0.5),
                                       ("saturation", 1.5), ("saturation", 0.3), ("hue", 0.1), ("hue", -0.25)])
def test_each_jitter_op_matches_torchvision_on_one_image(device, op, factor):
    u8 = photo()
    ours = G._JITTER_OPS[("brightness", "contrast", "saturation", "hue").index(op)](
        u8.to(device).float() / 255, torch.full((4,), factor, device=device)).cpu()
    ref = getattr(TF, f"adjust_{op}")(u8.float() / 255, factor)
    assert (ours - ref).abs().max() <= ONE_LEVEL
    # and the PIL op the CPU path runs, on uint8 (PIL rounds every step; hue goes through 8-bit HSV)
    pil = torch.stack([TF.pil_to_tensor(getattr(TF, f"adjust_{op}")(TF.to_pil_image(im), factor)) for im in u8])
    diff = (ours * 255 - pil.float()).abs()
    if op == "hue":  # PIL's 8-bit hue steps are 1/256 turn: a few levels on saturated pixels, 1 on average
        assert diff.mean() < 1.0
    else:
        assert diff.max() <= 2 + 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_grayscale_blur_and_normalisation_match_torchvision(device):
    u8 = photo()
    x = u8.float() / 255
    gray = G.rgb_to_grayscale(x.to(device)).cpu()
    assert (gray - TF.rgb_to_grayscale(x)).abs().max() <= ONE_LEVEL
    sigmas = torch.tensor([0.1, 0.7, 1.3, 2.0])
    blurred = G.gaussian_blur(x.to(device), sigmas.to(device), 23).cpu()
    for i, s in enumerate(sigmas.tolist()):
        assert (blurred[i] - TF.gaussian_blur(x[i], [23, 23], [s, s])).abs().max() <= ONE_LEVEL
    # the whole pipeline with everything off is just normalisation
    out = G.photometric(u8.to(device), params_for(4), SPEC).cpu()
    assert (out - TF.normalize(x, augment.IMAGENET_MEAN, augment.IMAGENET_STD)).abs().max() < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_per_sample_factors_and_order_compose_like_torchvision(device):
    u8 = photo(n=3, seed=1)
    p = params_for(3, jitter_on=[1, 1, 0], brightness=[1.2, 0.7, 1.5], contrast=[0.6, 1.3, 1.5],
                   saturation=[1.4, 0.2, 1.5], hue=[0.05, -0.1, 0.3], gray_on=[0, 1, 0], blur_on=[1, 0, 1],
                   sigma=[1.5, 1.0, 0.5])
    p[0, G.ORDER] = torch.tensor([3.0, 1.0, 0.0, 2.0])
    p[1, G.ORDER] = torch.tensor([2.0, 0.0, 3.0, 1.0])
    out = G.photometric(u8.to(device), p, SPEC).cpu()
    for i in range(3):
        ref = u8[i].float() / 255
        if p[i, G.JITTER_ON]:
            for op in p[i, G.ORDER].long().tolist():
                name = ("brightness", "contrast", "saturation", "hue")[op]
                ref = getattr(TF, f"adjust_{name}")(ref, float(p[i, G.BRIGHTNESS + op]))
        if p[i, G.GRAY_ON]:
            ref = TF.rgb_to_grayscale(ref, num_output_channels=3)
        if p[i, G.BLUR_ON]:
            ref = TF.gaussian_blur(ref, [SPEC.blur_kernel] * 2, [float(p[i, G.SIGMA])] * 2)
        ref = TF.normalize(ref, augment.IMAGENET_MEAN, augment.IMAGENET_STD)
        assert (out[i] - ref).abs().max() * 0.229 <= 2 * ONE_LEVEL, i


def test_gray_first_recipe_applies_grayscale_before_the_jitter():
    spec = moco_v1(40).spec()
    assert spec.gray_first and spec.jitter_p == 1.0 and spec.blur_kernel == 0
    u8 = photo(n=1)
    p = params_for(1, jitter_on=1, saturation=1.8, gray_on=1)
    # saturation of an already gray image changes nothing: the output stays gray
    out = G.photometric(u8, p, spec) * torch.tensor(augment.IMAGENET_STD).view(1, 3, 1, 1) \
        + torch.tensor(augment.IMAGENET_MEAN).view(1, 3, 1, 1)
    assert (out[0, 0] - out[0, 1]).abs().max() < 1e-5 and (out[0, 1] - out[0, 2]).abs().max() < 1e-5


@pytest.mark.parametrize("recipe", ["mocov2", "simclr"])
def test_drawn_parameters_follow_the_recipe(recipe):
    r = moco_v2(224) if recipe == "mocov2" else simclr_augmentation(224)
    spec = r.spec()
    torch.manual_seed(0)
    p = torch.stack([G.draw_params(spec) for _ in range(4000)])
    assert abs(p[:, G.JITTER_ON].mean() - 0.8) < 0.03
    assert abs(p[:, G.GRAY_ON].mean() - 0.2) < 0.03
    assert abs(p[:, G.BLUR_ON].mean() - 0.5) < 0.03
    b, c, s, h = spec.jitter
    for col, lo, hi in [(G.BRIGHTNESS, 1 - b, 1 + b), (G.CONTRAST, 1 - c, 1 + c), (G.SATURATION, 1 - s, 1 + s),
                        (G.HUE, -h, h), (G.SIGMA, 0.1, 2.0)]:
        v = p[:, col]
        assert v.min() >= lo - 1e-6 and v.max() <= hi + 1e-6
        assert v.min() < lo + 0.05 * (hi - lo) and v.max() > hi - 0.05 * (hi - lo)  # the whole range is used
    assert (p[:, G.ORDER].sort(dim=1).values == torch.arange(4).float()).all()  # a permutation every time
    assert len({tuple(o) for o in p[:, G.ORDER].long().tolist()}) == 24


def test_split_views_are_seeded_per_sample_and_stay_uint8(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "a.png"
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(path)
    base = FileListDataset([(str(path), 0)] * 4, ["a"])
    recipe = moco_v2(32, blur=True)
    ds = TransformedDataset(base, augment.TwoCropsTransform(recipe.split()))
    (v1, v2), _ = ds[(0, 123)]
    (w1, _), _ = ds[(1, 123)]
    (u1, _), _ = ds[(0, 124)]
    assert v1[0].dtype == torch.uint8 and v1[0].shape == (3, 32, 32) and v1[1].shape == (G.NUM_PARAMS,)
    assert torch.equal(v1[0], w1[0]) and torch.equal(v1[1], w1[1])  # same seed, same view
    assert not torch.equal(v1[1], v2[1]) and not torch.equal(v1[1], u1[1])  # views and seeds differ


@pytest.mark.parametrize("device", DEVICES)
def test_views_to_device_gives_normalised_channels_last_batches(device):
    spec = simclr_augmentation(32, blur=False).spec()
    torch.manual_seed(0)
    views = [[photo(n=8, size=32), torch.stack([G.draw_params(spec) for _ in range(8)])] for _ in range(2)]
    q, k = G.ViewsToDevice(torch.device(device), channels_last=True, spec=spec)(views)
    assert q.shape == (8, 3, 32, 32) and q.dtype == torch.float32 and q.device.type == device
    assert q.is_contiguous(memory_format=torch.channels_last)
    assert -2.2 < float(q.min()) and float(q.max()) < 2.7  # normalised [0, 1] images


def test_pil_blur_draws_sigma_from_the_seed_and_blurs():
    img = TF.to_pil_image(photo(n=1, size=64)[0])
    blur = augment.PILGaussianBlur((0.1, 2.0))
    torch.manual_seed(5)
    a = np.asarray(blur(img), dtype=np.float32)
    torch.manual_seed(5)
    b = np.asarray(blur(img), dtype=np.float32)
    assert (a == b).all()
    assert np.abs(np.diff(a, axis=1)).mean() < np.abs(np.diff(np.asarray(img, dtype=np.float32), axis=1)).mean()


def test_large_jpegs_decode_at_reduced_scale_only_when_crops_keep_their_pixels(tmp_path):
    big = tmp_path / "big.jpg"
    Image.new("RGB", (2000, 1500), (10, 200, 30)).save(big, quality=90)
    side = moco_v2(224).decode_side()  # 224 / sqrt(0.2) = 501
    assert side == 501
    assert pil_loader(str(big), side).size == (1000, 750)  # 1/2 scale: 1/4 would give 375 < 501
    assert pil_loader(str(big), 100).size == (250, 188)
    assert pil_loader(str(big)).size == (2000, 1500)
    png = tmp_path / "big.png"
    Image.new("RGB", (2000, 1500)).save(png)
    assert pil_loader(str(png), side).size == (2000, 1500)  # only JPEG has DCT scaling
    ds = TransformedDataset(FileListDataset([(str(big), 0)], []), moco_v2(224), decode_side=side)
    assert ds[(0, 1)][0].shape == (3, 224, 224)
    # the probe's and kNN's transforms keep their resize / smallest crop at full resolution too
    assert augment.eval_decode_side(224) == 256 and pil_loader(str(big), 256).size == (500, 375)
    assert augment.train_classifier_decode_side(224) == 792 and pil_loader(str(big), 792).size == (2000, 1500)
    assert augment.eval_decode_side(32) == augment.train_classifier_decode_side(32) == 32


def _split_bn_and_input():
    """A 4-group SplitBatchNorm in fp64 with non-trivial affine parameters, and an input whose
    mean and scale are far from 0 and 1."""
    torch.manual_seed(0)
    bn = SplitBatchNorm(16, 4).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn, (torch.randn(32, 16, 7, 7, dtype=torch.float64) * 3 + 2).requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_split_batchnorm_channels_last_equals_the_reshape_path(dtype):
    bn, x = _split_bn_and_input()
    fast = copy.deepcopy(bn)
    x_cl = x.detach().to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    y, y_cl = bn(x), fast(x_cl)
    assert y_cl.is_contiguous(memory_format=torch.channels_last) and y_cl.dtype == dtype
    g = torch.randn_like(y)
    y.backward(g)
    y_cl.backward(g.to(dtype).contiguous(memory_format=torch.channels_last))
    tol = 1e-10 if dtype == torch.float64 else 5e-2  # bf16 keeps 8 bits
    assert (y - y_cl.double()).abs().max() < tol * 4
    assert (x.grad - x_cl.grad.double()).abs().max() < tol
    for name in ("weight", "bias"):
        assert torch.allclose(getattr(bn, name).grad, getattr(fast, name).grad.double(), rtol=tol, atol=tol * 10)
    for name in ("running_mean", "running_var"):
        assert torch.allclose(getattr(bn, name), getattr(fast, name), rtol=tol, atol=tol)
    # eval mode: the plain BatchNorm with the running statistics, in any layout
    fast.eval()
    assert torch.allclose(fast(x.detach()), fast(x.detach().contiguous(memory_format=torch.channels_last)), atol=1e-10)


def test_split_batchnorm_under_torch_compile_equals_the_reshape_path():
    """What --compile traces (_group_batch_norm_ops, plain differentiable ops) against the
    reference reshape path in fp64: outputs, input/weight/bias gradients, running stats."""
    bn, x = _split_bn_and_input()
    traced = copy.deepcopy(bn)
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    y = bn(x)
    y_t = _group_batch_norm_ops(x_cl, traced.weight, traced.bias, traced.running_mean, traced.running_var,
                                4, traced.momentum, traced.eps)
    g = torch.randn_like(y)
    y.backward(g)
    y_t.backward(g)
    assert (y - y_t).abs().max() < 1e-10 and (x.grad - x_cl.grad).abs().max() < 1e-10
    for name in ("weight", "bias"):
        assert torch.allclose(getattr(bn, name).grad, getattr(traced, name).grad, atol=1e-10)
    for name in ("running_mean", "running_var"):
        assert torch.allclose(getattr(bn, name), getattr(traced, name), atol=1e-12)


@pytest.mark.slow
def test_a_split_batchnorm_resnet_compiles_to_one_graph_and_matches_eager():
    """No graph break in the query (grad) or key (no_grad) encoder, channels-last; a break
    per BN layer made every block a graph of its own, past dynamo's recompile limit, and
    --compile slower than eager. aot_eager traces forward and backward as inductor would."""
    import torch._dynamo as dynamo
    torch.manual_seed(0)
    net = build_backbone("resnet18", small_images=True, num_classes=8,
                         norm_layer=functools.partial(SplitBatchNorm, num_splits=2))
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    assert dynamo.explain(net)(x).graph_break_count == 0
    with torch.no_grad():
        assert dynamo.explain(net)(x).graph_break_count == 0
    eager = copy.deepcopy(net)
    compiled = torch.compile(net, backend="aot_eager")
    y, y_c = eager(x), compiled(x)
    y.square().sum().backward()
    y_c.square().sum().backward()
    torch.testing.assert_close(y_c, y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(net.conv1.weight.grad, eager.conv1.weight.grad, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(net.bn1.running_var, eager.bn1.running_var, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- solarization (BYOL's second view)

def test_solarize_inverts_at_and_above_the_threshold_as_torchvision_and_pil():
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    ours = G.solarize(levels.float() / 255)
    # [0, 1] units: 1 - x for x >= 0.5, else x (torchvision's solarize at threshold 0.5)
    x = levels.float() / 255
    assert torch.equal(ours, torch.where(x >= 0.5, 1 - x, x))
    assert torch.equal(ours, TF.solarize(x, 0.5))
    # uint8: 255 - x for x >= 128 (PIL's ImageOps.solarize, the CPU path's RandomSolarize at 128), exact
    expected = torch.where(levels >= 128, 255 - levels, levels)
    assert torch.equal((ours * 255).round().to(torch.uint8), expected)
    cpu = augment.Recipe(16, 1.0, ("solarize",), jitter=(0, 0, 0, 0), solarize_p=1.0)
    pil = TF.pil_to_tensor(cpu._op("solarize")(TF.to_pil_image(levels[0])))
    assert torch.equal(pil, expected[0])


@pytest.mark.parametrize("device", DEVICES)
def test_solarize_in_the_batched_pipeline_matches_the_cpu_recipe(device):
    """The batched path (jitter, gray, blur, then solarize) against torchvision's ops one image
    at a time, solarized where SOLARIZE_ON says so; and the CPU recipe's PIL ops on the same
    draws (solarize alone: exact)."""
    first, second = byol_views(40)
    spec = second.spec()
    assert spec.solarize_p == 0.2 and spec.blur_p == 0.1 and first.spec().solarize_p == 0.0
    u8 = photo(n=3, seed=2)
    p = params_for(3, jitter_on=[1, 0, 0], brightness=[1.3, 1, 1], blur_on=[0, 1, 0], sigma=[1, 1.2, 1],
                   solarize_on=[1, 1, 0])
    out = G.photometric(u8.to(device), p, spec).cpu()
    for i in range(3):
        ref = u8[i].float() / 255
        if p[i, G.JITTER_ON]:
            ref = TF.adjust_brightness(ref, float(p[i, G.BRIGHTNESS]))
        if p[i, G.BLUR_ON]:
            ref = TF.gaussian_blur(ref, [spec.blur_kernel] * 2, [float(p[i, G.SIGMA])] * 2)
        if p[i, G.SOLARIZE_ON]:
            ref = TF.solarize(ref, 0.5)
        ref = TF.normalize(ref, augment.IMAGENET_MEAN, augment.IMAGENET_STD)
        # (a pixel the blur leaves within rounding of the threshold may fall either side: none here)
        assert (out[i] - ref).abs().max() * 0.229 <= 2 * ONE_LEVEL, i
    # solarize alone on uint8 crops: the PIL op of the CPU path, bit for bit
    solar = G.photometric(u8.to(device), params_for(3, solarize_on=1), spec).cpu()
    pil = torch.stack([TF.pil_to_tensor(TF.solarize(TF.to_pil_image(im), 128)) for im in u8])
    ref = TF.normalize(pil.float() / 255, augment.IMAGENET_MEAN, augment.IMAGENET_STD)
    assert (solar - ref).abs().max() < 1e-5


def test_solarize_draws_follow_the_recipe_and_leave_other_recipes_draws_alone():
    first, second = byol_views(224)
    torch.manual_seed(0)
    p1 = torch.stack([G.draw_params(first.spec()) for _ in range(4000)])
    p2 = torch.stack([G.draw_params(second.spec()) for _ in range(4000)])
    assert p1[:, G.BLUR_ON].min() == 1 and p1[:, G.SOLARIZE_ON].max() == 0  # view 1: always blurred, never solarized
    assert abs(p2[:, G.BLUR_ON].mean() - 0.1) < 0.02 and abs(p2[:, G.SOLARIZE_ON].mean() - 0.2) < 0.03
    # the solarize draw comes last and only where the recipe solarizes: the other ops' draws are
    # those of a recipe without it, and a recipe without it draws nothing more (its stream is as before)
    plain = moco_v2(224).spec()
    solar = dataclasses.replace(plain, solarize_p=0.2)
    torch.manual_seed(1)
    a, x1, x2 = G.draw_params(plain), torch.rand(1), torch.rand(1)
    torch.manual_seed(1)
    b, after = G.draw_params(solar), torch.rand(1)
    assert torch.equal(a[:G.SOLARIZE_ON], b[:G.SOLARIZE_ON]) and a[G.SOLARIZE_ON] == 0
    assert b[G.SOLARIZE_ON] == float(x1 < 0.2) and torch.equal(after, x2)  # one draw more, the last


def test_gray_images_keep_solarize_and_solarize_must_come_last():
    first, second = byol_views(96, gray_images=True)
    assert "solarize" in second.ops and "gray" not in second.ops and second.jitter[2:] == (0.0, 0.0)
    assert second.spec().solarize_p == 0.2 and first.spec().blur_p == 1.0
    with pytest.raises(ValueError, match="solarize must follow"):
        augment.Recipe(32, 0.2, ("crop", "solarize", "jitter"), jitter=(0.4, 0.4, 0.4, 0.1), solarize_p=0.2).spec()


def test_a_pair_of_recipes_gives_each_view_its_own_draws_on_every_path(tmp_path):
    """two_view_data's three paths with BYOL's pair: the CPU transform, --gpu-augment's split
    (view 1's parameters always blur and never solarize), and --gpu-decode's worker, which
    draws exactly what the --gpu-augment worker draws for the same seed."""
    rng = np.random.default_rng(0)
    path = tmp_path / "a.png"
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(path)
    base = FileListDataset([(str(path), 0)] * 4, ["a"])
    pair = byol_views(96)
    cpu = TransformedDataset(base, augment.two_views(pair))
    assert [v.shape for v in cpu[(0, 5)][0]] == [(3, 96, 96)] * 2
    split = TransformedDataset(base, augment.TwoCropsTransform(pair[0].split(), pair[1].split()))
    encoded = TransformedDataset(base, D.EncodedViews(pair), read=D.read_sample)
    draws = []
    for seed in range(40):
        (v1, v2), _ = split[(0, seed)]
        draws.append((v1[1], v2[1]))
        assert torch.equal(encoded[(0, seed)][0][2], torch.stack([v1[1], v2[1]]))
    first = torch.stack([d[0] for d in draws])
    second = torch.stack([d[1] for d in draws])
    assert first[:, G.BLUR_ON].min() == 1 and first[:, G.SOLARIZE_ON].max() == 0
    assert second[:, G.BLUR_ON].mean() < 0.5 and second[:, G.SOLARIZE_ON].max() == 1
    # the device side applies each view's own spec
    batch = [[torch.stack([photo(n=1, size=96, seed=s)[0] for s in range(2)]), torch.stack(d)] for d in
             ([draws[0][0], draws[1][0]], [draws[0][1], draws[1][1]])]
    q, k = G.ViewsToDevice(torch.device("cpu"), spec=(pair[0].spec(), pair[1].spec()))(batch)
    assert q.shape == k.shape == (2, 3, 96, 96)
