"""--recipe small on sources much larger than the crop (common/train/source_views.py): the
view check of each candidate decides the views; flags given and resumed runs are kept."""
import argparse
import os

import numpy as np
import pytest
from PIL import Image

import main_moco
import main_simclr
from common.train import source_views


def finalize(module, argv, out):
    """The view check's choice: the labelled sets here would otherwise be left to the recipe
    trial (tests/test_trial.py), which measures the views on the labels instead."""
    return module.finalize_args(module.get_args_parser().parse_args(argv + ["--output-dir", str(out), "--no-trial"]))


@pytest.fixture(scope="module")
def inspection(tmp_path_factory):
    """48 images of tools/inspection_data.py at 128 px: one shared grid, the instance in a fine weave."""
    from tools.inspection_data import write_inspection_set
    root = tmp_path_factory.mktemp("inspection")
    write_inspection_set(str(root), 48, 128, 0, val_fraction=0.0)
    return str(root)


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    """48 colour images, each a smooth field of its own colours: a whole-image view tells it apart."""
    root = tmp_path_factory.mktemp("objects")
    rng = np.random.default_rng(0)
    for i in range(48):
        d = root / "train" / "ab"[i % 2]
        os.makedirs(d, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (3, 3, 3), dtype=np.uint8)).resize((128, 128), Image.BICUBIC) \
            .save(d / f"{i}.png")
    return str(root)


def figures(out: str):
    """{candidate description: pixel separation %} from the printed lines."""
    rows = [line.strip() for line in out.splitlines() if line.startswith("   ") and "% by pixels, " in line]
    return {r.split(": ")[0]: int(r.split(": ")[1].split("%")[0]) for r in rows}


@pytest.mark.long
def test_source_scale_views_where_whole_image_views_keep_no_instance(inspection, tmp_path, capsys):
    args = finalize(main_simclr, [inspection, "--recipe", "small", "--crop-size", "32", "-a", "resnet18"], tmp_path)
    out = capsys.readouterr().out
    measured = figures(out)
    # the method's own views of the grid leave no instance signal; a source-scale one does
    assert measured["the method's views"] < 100 * source_views.METHOD_PIXELS, out
    area = source_views.source_scale_area(32, 128)
    assert args.crop_min == args.crop_max == area == 0.0625
    chosen = source_views.describe({"crop_min": area, "crop_max": area, "color_strength": args.color_strength})
    assert measured[chosen] >= 100 * source_views.LEARNABLE_PIXELS and args.color_strength < 1
    assert list(measured)[-1] == chosen  # the first candidate to reach the level is used; later ones untried
    assert f"=> --recipe small uses {chosen}" in out
    # and its shorter budget: 20,000 images seen on 48 images, the recipe's warmup scaled with it
    assert args.epochs == 417 and args.warmup_epochs == round(10 * 417 / 2083, 2)
    assert "for 20,000 images seen: --epochs 417 --warmup-epochs 2" in out
    given = finalize(main_simclr, [inspection, "--recipe", "small", "--crop-size", "32", "--epochs", "3", "-a", "resnet18"],
                     tmp_path / "e")
    assert given.epochs == 3 and given.crop_max == 0.0625  # the views still chosen, the epochs kept


@pytest.mark.parametrize("script", [main_moco, main_simclr], ids=["moco", "simclr"])
def test_the_method_views_stay_where_they_keep_the_instance(script, objects, tmp_path, capsys):
    args = finalize(script, [objects, "--recipe", "small", "--crop-size", "32", "-a", "resnet18"], tmp_path)
    out = capsys.readouterr().out
    measured = figures(out)
    assert list(measured) == ["the method's views"] and "uses the method's views" in out  # nothing else tried
    assert measured["the method's views"] >= 100 * source_views.METHOD_PIXELS
    assert (args.crop_min, args.crop_max, args.color_strength) == (0.3, 1.0, 1.0)


def test_given_flags_small_sources_and_resumed_runs_measure_nothing(inspection, tmp_path, capsys):
    kept = finalize(main_simclr, [inspection, "--recipe", "small", "--crop-size", "32", "--color-strength", "0.5"],
                    tmp_path / "given")
    assert (kept.crop_min, kept.color_strength) == (0.3, 0.5) and "candidate" not in capsys.readouterr().out
    small = finalize(main_simclr, ["--dataset", "synthetic", "--recipe", "small"], tmp_path / "small")
    assert small.crop_min == 0.3 and "candidate" not in capsys.readouterr().out  # 32 px sources, 32 px crops

    def no_views(_):
        raise AssertionError("a resumed run must not measure again")
    args = argparse.Namespace(crop_size=32, crop_min=0.3, crop_max=1.0, color_strength=1.0, given_flags=set(),
                              recipe="small", arch="resnet18", small_images=True)
    saved = {"crop_min": 0.0625, "crop_max": 0.0625, "color_strength": 0.1}
    assert source_views.choose_views(args, [0, 1], 256, no_views, saved) is None
    assert (args.crop_min, args.crop_max, args.color_strength) == (0.0625, 0.0625, 0.1)


def test_the_not_learning_hint_keeps_source_scale_views():
    """A run on source-scale views is told to grow the crop at the same scale, not to take
    --crop-min 0.3, which would resize the source's detail away again."""
    from common.train.pretrain_args import learning_watch
    base = dict(crop_size=64, color_strength=0.1, epochs=10, warmup_epochs=0)
    scaled = learning_watch(argparse.Namespace(crop_min=0.0625, crop_max=0.0625, **base), 127, 0.08, "--temperature",
                            0.2).hint
    assert "--crop-size 128 --crop-min 0.25 --crop-max 0.25" in scaled and "--crop-min 0.3" not in scaled
    whole = learning_watch(argparse.Namespace(crop_min=None, crop_max=1.0, **base), 127, 0.08, "--temperature",
                           0.2).hint
    assert "larger crops (--crop-min 0.3, now 0.08)" in whole
