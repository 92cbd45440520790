"""The payoff of pretraining on the user's own train labels (common/eval/payoff.py): a
cross-validated logreg probe before and after, the verdict against the fold spread, the
WARNING when it did not pay off, payoff.json, and never a look at val."""
import json
import os

import pytest
import torch
from conftest import run_inline, write_image_folder

import main_moco
from common.eval import payoff
from common.eval.logreg import cross_validated_accuracy, stratified_folds


def test_folds_hold_every_class_evenly_and_depend_on_the_seed_only():
    y = torch.tensor([0] * 10 + [1] * 5)
    fold = stratified_folds(y, 5, seed=0)
    for f in range(5):
        assert (y[fold == f] == 0).sum() == 2 and (y[fold == f] == 1).sum() == 1
    assert torch.equal(fold, stratified_folds(y, 5, seed=0)) and not torch.equal(fold, stratified_folds(y, 5, seed=1))


def test_the_probe_scores_held_out_folds_separable_high_and_noise_at_chance():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    x = torch.randn(200, 16, generator=g)
    separable = x + 4.0 * y[:, None].float()
    assert min(cross_validated_accuracy(separable, y, 2)) == 100.0
    # 16 noise dimensions, 160 fitting images: held out, the probe cannot beat chance by much
    assert 35.0 < sum(cross_validated_accuracy(x, y, 2)) / 5 < 65.0


def test_the_verdict_is_the_mean_paired_gain_against_its_spread_over_folds():
    v = payoff.verdict([80.0, 82.0, 84.0], [70.0, 70.0, 70.0])
    assert v["gain"] == pytest.approx(12.0) and v["spread"] == pytest.approx(2.0) and v["paid_off"]
    v = payoff.verdict([71.0, 69.0, 72.0], [70.0, 70.0, 70.0])
    assert v["gain"] == pytest.approx(2 / 3) and not v["paid_off"]  # inside the spread (1.5)


def test_the_probe_reads_the_train_split_only(tmp_path, monkeypatch):
    import main_moco
    from common.distributed.collectives import DistEnv
    data = write_image_folder(tmp_path / "data", per_class=6, split_dirs=("train", "val"))
    read = []
    real = payoff.build_dataset
    monkeypatch.setattr(payoff, "build_dataset", lambda args, split: read.append(split) or real(args, split))
    args = main_moco.finalize_args(main_moco.get_args_parser().parse_args(
        [data, "-a", "resnet18", "--output-dir", str(tmp_path / "run")]))
    probe = payoff.PayoffProbe(args, DistEnv(0, 1, 0, torch.device("cpu"), False))
    assert read == ["train"]
    # --payoff-holdout 0.2: a class-stratified fifth held out, the probe fitted on the rest
    fitted = {probe.data.path(i) for i in range(len(probe.data))}
    held = {probe.held_at_size[args.crop_size].path(i) for i in range(len(probe.held))}
    assert len(fitted) == 10 and len(held) == 2 and not fitted & held
    assert len({os.path.basename(os.path.dirname(p)) for p in held}) == 2  # one of each class
    # ... and never among the images the run pretrains on
    from common.train.data import pretraining_images
    pretrained_on = pretraining_images(args)
    assert len(pretrained_on) == 10 and {pretrained_on.path(i) for i in range(10)} == fitted
    args.payoff_holdout = 0
    probe = payoff.PayoffProbe(args, DistEnv(0, 1, 0, torch.device("cpu"), False))
    assert len(probe.data) == 12 and probe.held == [] and len(pretraining_images(args)) == 12


def test_the_learning_run_paid_off_and_says_so_in_payoff_json(moco_pretrained):
    with open(os.path.join(os.path.dirname(moco_pretrained), "payoff.json")) as f:
        doc = json.load(f)
    assert doc["images"] + doc["held_out"] == 512 and 96 <= doc["held_out"] <= 108  # --payoff-holdout 0.2
    assert doc["epoch"] == 1 and doc["against"] == "untrained"
    assert len(doc["baselines"]["untrained"]["fold_top1"]) == len(doc["final"]["fold_top1"]) == payoff.PAYOFF_FOLDS
    v = doc["verdicts"]["untrained"]
    # this config over seeds 1-3, scored on the 104 held-out images: gains 25.0, 46.1, 36.4 points (spreads over
    # the 5 parts 7.3, 12.6, 10.6); cross-validated on seen images before --payoff-holdout: 35.4, 34.0, 28.9
    assert v["paid_off"] and v["gain"] > 15, v
    last = json.loads(open(os.path.join(os.path.dirname(moco_pretrained), "metrics.jsonl")).read().splitlines()[-1])
    assert last["paid_off"] is True and last["payoff_top1"] == pytest.approx(doc["final"]["top1"])


@pytest.mark.slow
def test_noise_labels_give_the_warning_and_a_resumed_run_keeps_its_baseline(tmp_path, capsys):
    # random pixels in two class folders: the labels say nothing a network could learn
    data = write_image_folder(tmp_path / "data", per_class=40, size=32, split_dirs=("",))
    out = tmp_path / "run"
    argv = [data, "-a", "resnet18", "--no-small-images", "-j", "0", "--crop-size", "32", "-b", "16", "--moco-k",
            "32", "--moco-dim", "16", "--bn-splits", "2", "--seed", "3", "-p", "100", "--output-dir", str(out)]
    ran = run_inline(capsys, main_moco.main, argv + ["--epochs", "1"])
    assert ("=> payoff: logreg probe fitted on 64 labelled train images and scored on the 16 held out of pretraining "
            "(--payoff-holdout), before training: untrained") in ran.stdout
    assert "WARNING: pretraining did not pay off on these images: the gain is inside the spread; try " \
           "--init imagenet" in ran.stdout
    first = json.load(open(out / "payoff.json"))
    # this run over seeds 3-6, 16 held-out images in 5 parts: gains -21.7, +35.0, -28.3, -5.0 points against
    # spreads 48, 36, 33, 42 (a gain that large on noise is what parts of 3-4 images allow)
    assert first["verdicts"]["untrained"]["paid_off"] is False

    ran = run_inline(capsys, main_moco.main, argv + ["--epochs", "2", "--resume", "auto"])
    assert "before training" not in ran.stdout and "=> payoff after epoch 1" in ran.stdout
    assert json.load(open(out / "payoff.json"))["baselines"] == first["baselines"]


@pytest.mark.slow
def test_without_train_labels_the_log_says_the_payoff_was_not_measured(tmp_path, capsys):
    data = write_image_folder(tmp_path / "flat", classes=("",), per_class=16, size=16, split_dirs=("",))
    ran = run_inline(capsys, main_moco.main, [data, "-a", "resnet18", "-j", "0", "-b", "8", "--moco-k", "16",
                                              "--moco-dim", "16", "--bn-splits", "2", "--epochs", "1", "-p", "100",
                                              "--output-dir", str(tmp_path / "run")])
    assert "=> payoff: not measured, the train split has no labels" in ran.stdout
    assert not (tmp_path / "run" / "payoff.json").exists()


def test_the_learned_size_is_the_whole_image_size_at_the_views_scale():
    import argparse
    assert payoff.learned_size(argparse.Namespace(crop_size=64, crop_max=(64 / 300) ** 2)) == 300
    assert payoff.learned_size(argparse.Namespace(crop_size=64, crop_max=1.0)) is None


def _stripes(root, per_class: int = 20, size: int = 64) -> str:
    """Two classes of 1 px stripes, horizontal and vertical, random phase and noise: resized
    into a 16 px crop both become one flat grey, at their own 64 px they differ."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, axis in (("h", 0), ("v", 1)):
            os.makedirs(os.path.join(root, split, c))
            for i in range(per_class):
                line = ((np.arange(size) + rng.integers(2)) % 2) * 200.0 + 28
                img = np.repeat(line[:, None] if axis == 0 else line[None, :], size, axis=1 - axis)
                img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img, "L").convert("RGB").save(os.path.join(root, split, c, f"{i}.png"))
    return str(root)


@pytest.mark.slow
def test_source_scale_views_are_scored_at_both_sizes_and_the_probes_follow_the_choice(tmp_path, capsys):
    import main_knn
    from common.ckpt.io import load_checkpoint
    data, out = _stripes(tmp_path / "data"), tmp_path / "run"
    area = str((16 / 64) ** 2)  # source-scale views: a 16 px crop of a 64 px source, not resized
    ran = run_inline(capsys, main_moco.main, [
        data, "-a", "resnet18", "--no-small-images", "-j", "0", "--crop-size", "16", "--crop-min", area, "--crop-max",
        area, "-b", "8", "--moco-k", "16", "--moco-dim", "16", "--bn-splits", "2", "--epochs", "1", "--seed", "0", "-p", "100",
        "--payoff-holdout", "0", "--output-dir", str(out)])
    doc = json.load(open(out / "payoff.json"))
    assert doc["sizes"] == [16, 64] and set(doc["by_size"]) == {"16", "64"}
    at = {int(s): d["final"]["top1"] for s, d in doc["by_size"].items()}
    assert at[64] >= 95 and at[64] > at[16], at  # resized to 16 px the stripes fade (87.5 with seed 0)
    assert doc["eval_size"] == 64 and doc["final"] == doc["by_size"]["64"]["final"]
    assert "main_lincls.py and main_knn.py evaluate this checkpoint at 64 px by default" in ran.stdout
    ckpt = load_checkpoint(str(out / "checkpoint_last.pth.tar"))
    assert ckpt["eval_size"] == 64 and ckpt["args"]["crop_size"] == 16
    knn = ["--pretrained", str(out / "checkpoint_last.pth.tar"), "-j", "0", "--knn-k", "5"]
    ran = run_inline(capsys, main_knn.main, [data] + knn + ["--output-dir", str(tmp_path / "knn")])
    assert "=> evaluating at 64 px, not the run's 16 px crop" in ran.stdout
    assert json.load(open(tmp_path / "knn" / "knn_results.json"))["crop_size"] == 64
    ran = run_inline(capsys, main_knn.main, [data] + knn + ["--crop-size", "16", "--output-dir", str(tmp_path / "k16")])
    assert "evaluating at 64 px" not in ran.stdout
    assert json.load(open(tmp_path / "k16" / "knn_results.json"))["crop_size"] == 16


def test_group_folds_keep_each_group_in_one_fold_and_near_copies_stop_scoring():
    from common.eval.logreg import group_folds
    groups = [f"s{i % 10}" for i in range(100)] + ["big"] * 30
    fold = group_folds(groups, 5, seed=0)
    for g in set(groups):
        assert len({int(fold[i]) for i, h in enumerate(groups) if h == g}) == 1, g
    assert sorted(torch.bincount(fold, minlength=5).tolist()) == [20, 20, 30, 30, 30]  # largest first, fewest-filled
    assert not torch.equal(fold, group_folds(groups, 5, seed=1))
    # 20 groups of near-copies, a label per group that nothing else predicts: shuffled folds
    # find each held-out image's copies in the fit, grouped folds are at chance
    g = torch.Generator().manual_seed(0)
    centre, label = torch.randn(20, 32, generator=g), torch.arange(20) % 2
    member = torch.arange(200) % 20
    x, y = centre[member] + 0.05 * torch.randn(200, 32, generator=g), label[member]
    names = [f"g{int(m)}" for m in member]
    assert min(cross_validated_accuracy(x, y, 2)) == 100.0
    assert sum(cross_validated_accuracy(x, y, 2, groups=names)) / 5 < 75.0


def test_payoff_groups_come_from_file_names_and_a_bad_pattern_is_one_sentence(tmp_path):
    from common.distributed.collectives import DistEnv
    from common.errors import UserError
    data = write_image_folder(tmp_path / "data", per_class=6, split_dirs=("train",))
    for c in ("a", "b"):  # 0.png .. 5.png -> s0_0.png: six groups
        for i in range(6):
            os.rename(os.path.join(data, "train", c, f"{i}.png"), os.path.join(data, "train", c, f"s{i}_{c}.png"))
    parse = main_moco.get_args_parser().parse_args
    env = DistEnv(0, 1, 0, torch.device("cpu"), False)
    args = main_moco.finalize_args(parse([data, "--payoff-groups", r"^(s\d+)_", "--output-dir", str(tmp_path / "r")]))
    probe = payoff.PayoffProbe(args, env)
    # held out: whole groups, three of the six (the verdict's parts), none of their images fitted
    assert probe.groups is None and len(set(probe.held_groups)) == 3 and len(probe.held) == 6
    fitted = {os.path.basename(probe.data.path(i)).split("_")[0] for i in range(len(probe.data))}
    assert len(fitted) == 3 and not fitted & set(probe.held_groups)
    args.payoff_holdout = 0  # without a holdout: 5 folds, each group in one
    probe = payoff.PayoffProbe(args, env)
    assert sorted(set(probe.groups)) == [f"s{i}" for i in range(6)] and len(probe.groups) == 12
    for pattern, said in ((r"^(t\d+)_", "matches no group in 12 of the 12 labelled file names, e.g."),
                          (r"_(a|b)\.", "finds 2 group(s) in the labelled file names; the 5-fold probe needs at least 5"),
                          ("(", "is not a regular expression")):
        args.payoff_groups = pattern
        with pytest.raises(UserError, match=said.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
            payoff.PayoffProbe(args, env)
    args.payoff_holdout, args.payoff_groups = 0.2, r"^(s)\d"  # one group: nothing to hold out and fit on
    with pytest.raises(UserError, match="finds 1 group.s. in the labelled file names; --payoff-holdout needs at least 2"):
        payoff.PayoffProbe(args, env)


def test_inpainting_has_no_views_and_no_learned_size():
    import main_inpaint
    args = main_inpaint.get_args_parser().parse_args(["--dataset", "synthetic"])
    assert payoff.learned_size(args) is None


def test_with_two_sizes_the_probe_scores_a_smaller_sample_at_both(tmp_path, monkeypatch):
    from common.distributed.collectives import DistEnv
    data = write_image_folder(tmp_path / "data", per_class=12, size=32, split_dirs=("train",))
    monkeypatch.setattr(payoff, "TWO_SIZES_IMAGES", 10)
    parse = main_moco.get_args_parser().parse_args
    env = DistEnv(0, 1, 0, torch.device("cpu"), False)
    one = payoff.PayoffProbe(main_moco.finalize_args(parse([data, "--crop-size", "16", "--output-dir", "r"])), env)
    assert one.sizes == [16] and len(one.data) + len(one.held) == 24
    two = payoff.PayoffProbe(main_moco.finalize_args(parse([data, "--crop-size", "16", "--crop-min", "0.25",
                                                            "--crop-max", "0.25", "--output-dir", "r"])), env)
    assert two.sizes == [16, 32] and len(two.at_size[16]) == len(two.at_size[32]) == 10


def test_held_out_parts_are_even_and_hold_every_class():
    y = torch.arange(16) % 8  # 8 classes of 2 images: dealt from part 0 per class, parts 2-4 would be empty
    part = payoff.held_parts(y, 5, seed=0)
    assert sorted(torch.bincount(part, minlength=5).tolist()) == [3, 3, 3, 3, 4]
    y = torch.tensor([0] * 50 + [1] * 25)
    part = payoff.held_parts(y, 5, seed=1)
    for p in range(5):
        assert torch.bincount(y[part == p]).tolist() == [10, 5]
    assert torch.equal(part, payoff.held_parts(y, 5, seed=1)) and not torch.equal(part, payoff.held_parts(y, 5, seed=2))


def test_the_warning_says_a_loss_as_a_loss_and_points_full_depth_runs_at_per_image_norm():
    """Inside the spread: 'inside the spread'; below minus the spread (the low-byte set's run:
    48.0 against 85.0, gain -37.0, spread 10.2): 'got worse'; a full-depth run normalised by the
    set's statistics is pointed at --channel-norm image first, one normalised per image is not."""
    from common.data.channels import RGB, Channels
    from common.eval.payoff import no_gain_warning
    inside = no_gain_warning(1.0, 1.6, RGB)
    assert "the gain is inside the spread; try --init imagenet" in inside and "--channel-norm" not in inside
    worse = no_gain_warning(-37.0, 10.2, Channels(1, (0.5,), (0.1,)))
    assert "the features got worse than the ones it started from (-37.0, beyond the spread 10.2)" in worse
    assert "; try --channel-norm image (when the offset or exposure varies" in worse
    assert "--channel-norm" not in no_gain_warning(-37.0, 10.2, Channels(1, (0.5,), (0.1,), per_image=True))
    assert "inside the spread" in no_gain_warning(-5.0, 10.2, RGB)
