"""A contrastive run that never leaves chance says so from its second epoch, and
--stop-if-not-learning stops it there with the checkpoint kept (common/watch/collapse.py
LearningWatch); runs that learn are not flagged."""
import json
import os

import numpy as np
import pytest
from conftest import run_inline
from PIL import Image

import main_moco
import main_simclr
from common.train.run import NOT_LEARNING_EXIT
from common.watch.collapse import NEAR_CHANCE, LearningWatch


def test_the_watch_judges_from_the_second_epoch_against_chance():
    watch = LearningWatch(chance=1.0, epochs=10, hint="weaker colour jitter")
    assert watch.update(0, 0.5) is None  # MoCo's first epoch meets a random queue: not judged
    message = watch.update(1, 1.5)
    assert "1.50% against 1.00% by chance" in message and "try weaker colour jitter" in message
    assert watch.update(2, 2.0) and watch.stuck_epochs == 2
    assert watch.update(3, NEAR_CHANCE * 1.0) is None and watch.stuck_epochs == 0  # learning now
    assert LearningWatch(chance=1.0, epochs=1, hint="x").update(0, 1.0)  # a one-epoch run: its only epoch


def test_the_watch_leaves_the_warmup_epochs_alone():
    """A run whose lr is still rising is not judged (the warning used to fire in SimCLR's
    warmup and be gone an epoch later); the first epoch wholly past the warmup is, and the
    run's last epoch always is."""
    watch = LearningWatch(chance=1.0, epochs=20, hint="x", warmup_epochs=2.5)
    assert [watch.update(e, 1.0) is None for e in range(3)] == [True, True, True] and watch.stuck_epochs == 0
    assert watch.update(3, 1.0) and watch.stuck_epochs == 1
    assert LearningWatch(chance=1.0, epochs=2, hint="x", warmup_epochs=10).update(1, 1.0)  # the last epoch


@pytest.fixture(scope="module")
def flat_gray(tmp_path_factory) -> str:
    """128 images of one flat grey (a little pixel noise): after a crop of 1 % and full jitter
    two views of one image are no more alike than views of two: the instance is gone."""
    root = tmp_path_factory.mktemp("gray")
    rng = np.random.default_rng(0)
    for i in range(128):
        os.makedirs(root / "train" / "ab"[i % 2], exist_ok=True)
        arr = np.clip(128 + rng.normal(0, 3, (32, 32, 1)), 0, 255).astype(np.uint8).repeat(3, 2)
        Image.fromarray(arr).save(root / "train" / "ab"[i % 2] / f"{i}.png")
    return str(root)


@pytest.mark.parametrize("script, extra", [
    (main_simclr, ["--warmup-epochs", "1"]),  # (SimCLR's 10 warmup epochs would not be judged)
    (main_moco, ["--moco-k", "64", "--mlp", "--aug-plus", "--bn-splits", "2"]),
], ids=["simclr", "moco"])
@pytest.mark.slow
def test_a_run_at_chance_is_flagged_and_can_stop(flat_gray, tmp_path, capsys, script, extra):
    argv = [flat_gray, "-a", "resnet18", "--no-small-images", "-j", "0", "--crop-size", "32", "-b", "32",
            "--crop-min", "0.01", "--color-strength", "1", "--epochs", "20", "--seed", "0", "-p", "100"] + extra
    proc = run_inline(capsys, script.main, argv + ["--epochs", "2", "--output-dir", str(tmp_path / "warn")])
    # told before the first step already (common/watch/view_check.py), then by the epoch lines
    assert "warning: the augmentations leave almost no instance signal" in proc.stdout.split("Epoch [0/2]")[0]
    epoch1 = next(line for line in proc.stdout.splitlines() if line.startswith("=> epoch 1 done"))
    assert "WARNING: the contrastive accuracy is" in epoch1 and "the run is not learning" in epoch1
    assert "--color-strength 0.5" in epoch1 and "--crop-min 0.3, now 0.01" in epoch1
    rec = [json.loads(line) for line in open(tmp_path / "warn" / "metrics.jsonl")]
    assert [r["not_learning"] for r in rec] == [False, True]

    # --stop-if-not-learning: two epochs in a row near chance (epochs 1 and 2), a tenth of 20 epochs
    out = tmp_path / "stop"
    proc = run_inline(capsys, script.main, argv + ["--stop-if-not-learning", "--output-dir", str(out)], check=False)
    assert proc.returncode == NOT_LEARNING_EXIT and "--stop-if-not-learning: stopping after epoch 2" in proc.stdout
    assert len(open(out / "metrics.jsonl").read().splitlines()) == 3 and os.path.isfile(out / "checkpoint_last.pth.tar")


def test_the_learning_fixture_is_not_flagged(moco_pretrained):
    rec = [json.loads(line) for line in open(os.path.join(os.path.dirname(moco_pretrained), "metrics.jsonl"))]
    assert [r["not_learning"] for r in rec] == [False, False]


def test_the_view_check_separates_an_image_s_views_from_other_images():
    import torch
    from conftest import MOCO_LEARN

    from common.data.datasets import build_dataset
    from common.watch.view_check import _separation, view_check, view_check_message
    from moco.augment import moco_v2

    x = torch.randn(32, 8)
    assert _separation(x, x) == 1.0 and abs(_separation(x, torch.randn(32, 8)) - 0.5) < 0.1
    args = main_moco.get_args_parser().parse_args(MOCO_LEARN)
    result = view_check(build_dataset(args, "pretrain"), moco_v2(32, blur=False, strength=0.25), "resnet18", False,
                        torch.device("cpu"))
    assert result["images"] == 64 and result["features"] > 0.7  # 0.81 measured: the learning tests' recipe
    assert "warning" not in view_check_message(result, "x")


def test_the_view_check_leaves_the_random_state_as_it_was():
    import torch
    import argparse

    from common.data.datasets import build_dataset
    from common.watch.view_check import view_check
    from simclr.augment import simclr_augmentation
    ds = build_dataset(argparse.Namespace(in_channels=None, dataset="synthetic", data="", synthetic_size=16, synthetic_classes=2,
                                          synthetic_image_size=32), "pretrain")
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    view_check(ds, simclr_augmentation(32, blur=False), "resnet18", False, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)


def test_view_check_only_tells_views_that_destroy_the_instance_from_views_that_keep_it(tmp_path, capsys):
    """--view-check-only: the start-of-run view check of the script's own recipe, then exit 0
    with nothing trained or written (no output folder, no lock). Flat grey images under a 1 %
    crop and full jitter leave no instance signal (the warning); the synthetic set's views
    under MoCo v2's recipe keep it; a seed gives the same figures twice."""
    import main_moco_v3
    rng = np.random.default_rng(0)
    for i in range(64):
        os.makedirs(tmp_path / "gray" / "train" / "ab"[i % 2], exist_ok=True)
        arr = np.clip(128 + rng.normal(0, 3, (32, 32, 1)), 0, 255).astype(np.uint8).repeat(3, 2)
        Image.fromarray(arr).save(tmp_path / "gray" / "train" / "ab"[i % 2] / f"{i}.png")
    common = ["-a", "resnet18", "--no-small-images", "-j", "0", "--crop-size", "32", "--view-check-only"]
    out = tmp_path / "run"
    flat = run_inline(capsys, main_simclr.main, [str(tmp_path / "gray"), "--crop-min", "0.01", "--color-strength", "1",
                                                 "--output-dir", str(out)] + common)
    assert "seed 0: view check on 64 images" in flat.stdout
    assert "warning: the augmentations leave almost no instance signal" in flat.stdout
    assert not out.exists()
    kept = run_inline(capsys, main_moco.main, ["--dataset", "synthetic", "--synthetic-size", "64", "--aug-plus",
                                               "--color-strength", "0.25", "--view-check-seeds", "3", "3",
                                               "--output-dir", str(out)] + common)
    lines = [line.split(": ", 1)[1] for line in kept.stdout.splitlines() if line.startswith("seed 3: ")]
    assert len(lines) == 2 and lines[0] == lines[1] and "no instance signal" not in kept.stdout
    assert int(lines[0].split("% by the untrained")[0].rsplit(" ", 1)[1]) > 55
    assert not out.exists()
    v3 = run_inline(capsys, main_moco_v3.main, ["--dataset", "synthetic", "--synthetic-size", "64",
                                                "--output-dir", str(out)] + common)
    assert "seed 0: view check on 64 images" in v3.stdout and not out.exists()
