"""--recipe small: fills the flags left at their defaults, keeps the ones given, fits the
MoCo queue to the dataset, prints every value it set, and stores them in the args."""
import pytest

import main_moco
import main_simclr


def finalize(module, argv, tmp_path):
    parser = module.get_args_parser()
    return module.finalize_args(parser.parse_args(argv + ["--output-dir", str(tmp_path)]))


def test_moco_small_recipe_fits_the_queue_and_keeps_given_flags(tmp_path, capsys):
    args = finalize(main_moco, ["--dataset", "synthetic", "--synthetic-size", "1736", "--recipe", "small",
                                "--moco-t", "0.2"], tmp_path)
    out = capsys.readouterr().out
    assert args.moco_k == 128 and args.batch_size == 64  # a tenth of 1,736 images, a multiple of the batch
    assert (args.lr, args.cos, args.mlp, args.aug_plus, args.moco_m, args.crop_min) == (0.06, True, True, True,
                                                                                        0.99, 0.3)
    assert args.moco_t == 0.2  # given on the command line: kept
    assert args.epochs == 115  # 200,000 images seen (common.train.recipes.SMALL_DATA_BUDGET) / 1,736
    assert "--recipe small for 1736 images at 32 px sets:" in out and "--moco-k 128" in out
    assert "kept from the command line: --moco-t 0.2" in out
    default = finalize(main_moco, ["--dataset", "synthetic"], tmp_path / "d")
    assert (default.moco_k, default.moco_m, default.mlp) == (65536, 0.999, False)  # the default recipe: untouched


@pytest.mark.slow
def test_simclr_small_recipe_uses_sgd_and_a_short_warmup(tmp_path, capsys):
    args = finalize(main_simclr, ["--dataset", "synthetic", "--recipe", "small", "--epochs", "20"], tmp_path)
    out = capsys.readouterr().out
    assert (args.optimizer, args.lr, args.lr_scaling, args.temperature, args.batch_size) == ("sgd", 0.1, "none",
                                                                                            0.2, 64)
    assert args.warmup_epochs == 2.0 and "--warmup-epochs 2" in out
    assert args.epochs == 20 and "kept from the command line: --epochs 20" in out
    budget = finalize(main_simclr, ["--dataset", "synthetic", "--synthetic-size", "2000", "--recipe", "small"],
                      tmp_path / "e")
    assert budget.epochs == 50 and budget.warmup_epochs == 5.0  # 100,000 images seen; a tenth of them warm up
    big = finalize(main_simclr, ["/data/photos", "--dataset", "synthetic", "--recipe", "small", "--crop-size",
                                 "96"], tmp_path / "b")
    assert big.crop_min is None  # 0.3 is for <= 64 px objects; 96 px keeps SimCLR's 0.08


@pytest.mark.slow
def test_flags_typed_at_their_default_value_are_kept(tmp_path, capsys):
    """A flag given on the command line is the user's choice even when it equals the
    default: the recipe must not replace it (argparse alone cannot tell them apart)."""
    args = finalize(main_moco, ["--dataset", "synthetic", "--recipe", "small", "--moco-t", "0.07", "--lr", "0.03",
                                "--moco-m", "0.999"], tmp_path)
    assert (args.moco_t, args.lr, args.moco_m) == (0.07, 0.03, 0.999)
    kept = capsys.readouterr().out.split("kept from the command line: ")[1]
    assert all(f in kept for f in ("--moco-t 0.07", "--lr 0.03", "--moco-m 0.999"))
    assert {"moco_t", "lr", "moco_m"} <= set(args.given_flags)
    simclr = finalize(main_simclr, ["--dataset", "synthetic", "--synthetic-size", "2000", "--recipe", "small",
                                    "-b", "256", "--lr", "0.3", "--temperature", "0.1", "--optimizer", "lars",
                                    "--epochs", "100"], tmp_path / "s")
    assert (simclr.batch_size, simclr.lr, simclr.temperature, simclr.optimizer, simclr.epochs) == (256, 0.3, 0.1,
                                                                                                  "lars", 100)
    assert simclr.warmup_epochs == 10.0  # a tenth of the 100 epochs in use, not of the recipe's 50


def test_the_queue_fits_the_batch_in_use(tmp_path):
    args = finalize(main_moco, ["--dataset", "synthetic", "--synthetic-size", "1736", "--recipe", "small",
                                "-b", "48"], tmp_path)
    assert args.batch_size == 48 and args.moco_k == 144  # a multiple of 48 within a tenth of 1,736 (173)
    sym = finalize(main_moco, ["--dataset", "synthetic", "--synthetic-size", "1736", "--recipe", "small",
                               "--symmetric"], tmp_path / "s")
    assert sym.moco_k == 128 and sym.moco_k % (2 * sym.batch_size) == 0  # two keys per image per step


@pytest.mark.slow
def test_a_resumed_recipe_run_keeps_its_epochs_on_a_grown_dataset(tmp_path, capsys):
    from conftest import run_inline
    tiny = ["--dataset", "synthetic", "-a", "resnet18", "-j", "0", "--recipe", "small", "--moco-dim", "16",
            "-p", "100", "--no-payoff", "--output-dir", str(tmp_path)]
    # 64 images: 200,000 images seen would be 3,125 epochs; stop the run after one
    run_inline(capsys, main_moco.main, tiny + ["--synthetic-size", "64", "--epochs", "1"])
    ckpt_epochs = 1
    capsys.readouterr()
    args = finalize(main_moco, tiny[:-2] + ["--synthetic-size", "128", "--resume", "auto"], tmp_path)
    out = capsys.readouterr().out
    assert args.epochs == ckpt_epochs  # kept from the checkpoint, not 200,000 / 128
    assert args.moco_k == 64  # the queue it was built with (a tenth of 64 images, one batch)
    assert "the resumed run keeps the values it started with" in out and "would set --epochs 1562" in out


def _png_folder(root, size, mode, n=6):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / "train" / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(d / f"{i}.png")
    return str(root)


@pytest.mark.slow
def test_the_recipe_follows_the_data_grayscale_and_source_size(tmp_path, capsys):
    import argparse

    from common.data.datasets import build_dataset
    from common.train.recipes import crop_for_source, profile_data
    gray = _png_folder(tmp_path / "gray", (256, 200), "L")
    colour = _png_folder(tmp_path / "colour", (40, 48), "RGB")
    profile = profile_data(build_dataset(argparse.Namespace(dataset="imagefolder", data=gray, in_channels=None),
                                         "pretrain"))
    assert (profile.images, profile.grayscale, profile.short_side) == (6, True, 200)
    colour_args = argparse.Namespace(dataset="imagefolder", data=colour, in_channels=None)
    assert not profile_data(build_dataset(colour_args, "pretrain")).grayscale
    args = finalize(main_simclr, [gray, "--recipe", "small"], tmp_path / "g")
    out = capsys.readouterr().out
    assert args.gray_images and args.crop_size == crop_for_source(200, 224)
    assert "grayscale, median shortest side 200 px" in out and "--gray-images" in out
    small = finalize(main_moco, [colour, "--recipe", "small"], tmp_path / "c")
    assert not small.gray_images and small.crop_size == 32 and small.small_images  # a 40 px source: 32 px crops
    kept = finalize(main_simclr, [gray, "--recipe", "small", "--crop-size", "48"], tmp_path / "k")
    assert kept.crop_size == 48 and "kept from the command line: --crop-size 48" in capsys.readouterr().out
    assert [crop_for_source(s, 224) for s in (0, 28, 32, 37, 48, 64, 256, 4000)] == [224, 32, 32, 32, 32, 64, 64, 64]


def test_gray_views_drop_the_ops_that_do_nothing_to_a_gray_image():
    from moco.augment import moco_v1, moco_v2
    from simclr.augment import simclr_augmentation
    for full, gray in ((simclr_augmentation(32), simclr_augmentation(32, gray_images=True)),
                       (moco_v2(32), moco_v2(32, gray_images=True)), (moco_v1(32), moco_v1(32, gray_images=True))):
        assert "gray" in full.ops and "gray" not in gray.ops
        assert gray.jitter == full.jitter[:2] + (0.0, 0.0) and gray.crop_min == full.crop_min
        assert gray.spec().gray_p == 0.0


def test_crop_max_bounds_the_crops_and_is_checked(tmp_path):
    import pytest
    from PIL import Image

    from common.errors import UserError
    from simclr.augment import simclr_augmentation
    r = simclr_augmentation(16, blur=False, crop_min=0.04, crop_max=0.06)
    assert r._pil.transforms[0].scale == (0.04, 0.06)
    # a 16 px view of at most 6 % of a 256 px image: the source's own pixels, no downsampling beyond ~1x
    img = Image.new("RGB", (256, 256))
    assert r(img).shape == (3, 16, 16)
    assert r.split().geometric.transforms[0].scale == (0.04, 0.06)
    with pytest.raises(UserError, match="--crop-max 0.2 must be"):
        finalize(main_simclr, ["--dataset", "synthetic", "--crop-min", "0.3", "--crop-max", "0.2"], tmp_path)


def test_the_probes_take_the_crop_the_run_learned_on(tmp_path):
    """--recipe small may choose the crop: main_lincls.py and main_knn.py --pretrained CKPT then
    use it unless --crop-size is given (the default for the data otherwise)."""
    import argparse

    import torch

    from common.ckpt.pretrained import follow_checkpoint
    path = str(tmp_path / "ckpt.pth.tar")
    torch.save({"state_dict": {}, "arch": "resnet18", "method": "simclr",
                "args": {"crop_size": 64, "small_images": False}}, path)

    def followed(**given):
        args = argparse.Namespace(**{"pretrained": path, "arch": None, "crop_size": None, "small_images": None,
                                     "dataset": "imagefolder", "in_channels": None, "channel_norm": None,
                                     **given})
        follow_checkpoint(args)
        return args.crop_size, args.small_images, args.arch
    assert followed() == (64, False, "resnet18")
    assert followed(crop_size=96) == (96, False, "resnet18")
    assert followed(pretrained="none") == (224, False, "resnet50")
    assert followed(pretrained="none", dataset="synthetic") == (32, True, "resnet50")
