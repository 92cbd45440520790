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
    from common.dist.collectives import DistEnv
    data = write_image_folder(tmp_path / "data", per_class=6, split_dirs=("train", "val"))
    read = []
    real = payoff.build_dataset
    monkeypatch.setattr(payoff, "build_dataset", lambda args, split: read.append(split) or real(args, split))
    args = main_moco.finalize_args(main_moco.get_args_parser().parse_args(
        [data, "-a", "resnet18", "--output-dir", str(tmp_path / "run")]))
    probe = payoff.PayoffProbe(args, DistEnv(0, 1, 0, torch.device("cpu"), False))
    assert read == ["train"] and len(probe.data) == 12


def test_the_learning_run_paid_off_and_says_so_in_payoff_json(moco_pretrained):
    with open(os.path.join(os.path.dirname(moco_pretrained), "payoff.json")) as f:
        doc = json.load(f)
    assert doc["images"] == 512 and doc["epoch"] == 1 and doc["against"] == "untrained"
    assert len(doc["baselines"]["untrained"]["fold_top1"]) == len(doc["final"]["fold_top1"]) == payoff.PAYOFF_FOLDS
    v = doc["verdicts"]["untrained"]
    # this config over seeds 1-3: gains 35.4, 34.0, 28.9 points (fold spreads 8.7, 4.2, 4.2)
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
    assert "=> payoff: 5-fold logreg probe on 80 labelled train images before training: untrained" in ran.stdout
    assert "WARNING: pretraining did not pay off on these images: the gain is inside the fold spread; try " \
           "--init imagenet" in ran.stdout
    first = json.load(open(out / "payoff.json"))
    # this run over seeds 3-6: gains -17.5, +10.0, 0.0, -1.2 points against fold spreads 20, 21, 15, 17
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
