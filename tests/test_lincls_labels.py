"""The labels a probe trains and is scored on: metrics against a hand-computed example,
stratified label-fraction subsets, a partly labelled csv, and balanced sampling."""
import json
import os
from collections import Counter

import pytest
import torch
from conftest import SYNTHETIC, run_main, write_image_folder
from test_lincls import lincls

import main_lincls
from common.data.datasets import build_dataset
from common.data.loader import ResumableSampler
from common.data.subsets import stratified_subset
from common.eval.metrics import accuracy, classification_report, confusion_matrix, precision_recall_f1
from lincls.balance import BalancedSampler, class_weights
from lincls.data import training_subset


# ---------------------------------------------------------------- metrics

def test_metrics_match_a_hand_computed_example():
    # 3 classes, 8 samples; rows true, columns predicted:
    #   true 0: predicted 0,0,1      -> [2, 1, 0]
    #   true 1: predicted 1,1,2      -> [0, 2, 1]
    #   true 2: predicted 0,2        -> [1, 0, 1]
    target = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    pred = torch.tensor([0, 0, 1, 1, 1, 2, 0, 2])
    conf = confusion_matrix(pred, target, 3)
    assert conf.tolist() == [[2, 1, 0], [0, 2, 1], [1, 0, 1]]
    prf = precision_recall_f1(conf)
    # precision = tp / column sum: 2/3, 2/3, 1/2; recall = tp / row sum: 2/3, 2/3, 1/2
    torch.testing.assert_close(prf["precision"], torch.tensor([2 / 3, 2 / 3, 1 / 2], dtype=torch.double))
    torch.testing.assert_close(prf["recall"], torch.tensor([2 / 3, 2 / 3, 1 / 2], dtype=torch.double))
    torch.testing.assert_close(prf["f1"], torch.tensor([2 / 3, 2 / 3, 1 / 2], dtype=torch.double))
    assert prf["support"].tolist() == [3, 3, 2]

    # an asymmetric case: class 2 never predicted -> precision 0 (not NaN), F1 0
    conf = confusion_matrix(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 2, 2]), 3)
    prf = precision_recall_f1(conf)
    torch.testing.assert_close(prf["precision"], torch.tensor([0.5, 0.5, 0.0], dtype=torch.double))
    torch.testing.assert_close(prf["recall"], torch.tensor([1.0, 1.0, 0.0], dtype=torch.double))
    torch.testing.assert_close(prf["f1"], torch.tensor([2 / 3, 2 / 3, 0.0], dtype=torch.double))

    # logits whose argmax is `pred` above; top-2 adds the second-best class
    logits = torch.tensor([[3., 2, 1], [3, 1, 2], [1, 3, 2], [1, 3, 2], [2, 3, 1], [1, 2, 3], [3, 1, 2], [1, 2, 3]])
    rep = classification_report(logits, target, ["a", "b", "c"])
    assert rep["acc1"] == pytest.approx(100 * 5 / 8)
    assert rep["acc5"] == 100.0 and rep["top5_k"] == 3  # top-5 clipped to 3 classes
    assert accuracy(logits, target, topk=(2,))[0] == pytest.approx(100 * 7 / 8)  # sample 3 (true 0) ranks 0 last
    assert rep["macro_precision"] == pytest.approx(100 * (2 / 3 + 2 / 3 + 1 / 2) / 3)
    assert rep["macro_f1"] == pytest.approx(100 * (2 / 3 + 2 / 3 + 1 / 2) / 3)
    assert rep["per_class"][2] == {"class": "c", "precision": pytest.approx(50.0), "recall": pytest.approx(50.0),
                                   "f1": pytest.approx(50.0), "support": 2}


# ---------------------------------------------------------------- label subsets and sampling

def test_label_fraction_subset_is_stratified_seeded_and_reproducible(tmp_path):
    targets = [c for c in range(4) for _ in range(10 * (c + 1))]  # 10, 20, 30, 40 images per class
    a = stratified_subset(targets, 0.1, seed=0)
    assert a == stratified_subset(targets, 0.1, seed=0)  # reproducible
    assert a != stratified_subset(targets, 0.1, seed=1)  # the seed matters
    assert Counter(targets[i] for i in a) == {0: 1, 1: 2, 2: 3, 3: 4}  # 10% of every class
    assert len(set(a)) == len(a)
    with pytest.raises(main_lincls.UserError, match="leaves class 'x'.*at least 0.1"):
        stratified_subset(targets, 0.04, seed=0, class_names=["x", "y", "z", "w"])

    # main_lincls saves the subset next to the run and --label-subset reuses it
    args = main_lincls.finalize_args(main_lincls.get_args_parser().parse_args(
        SYNTHETIC + ["--synthetic-size", "80", "--pretrained", "none", "--label-fraction", "0.2",
                     "--output-dir", str(tmp_path / "a")]))
    train = build_dataset(args, "train")
    subset, chosen = training_subset(train, args)
    path = str(tmp_path / "a" / "label_subset.json")
    assert chosen == f"label fraction 0.2, saved to {path}" and os.path.isfile(path)
    assert subset.indices == stratified_subset(train.targets, 0.2, seed=0)
    assert Counter(subset.targets) == {c: 2 for c in range(8)}  # 10 per class -> 2 each
    args.label_fraction, args.label_subset = 1.0, path
    again, _ = training_subset(train, args)
    assert again.indices == subset.indices


@pytest.mark.slow
def test_a_partly_labelled_csv_trains_the_probe_on_its_labelled_rows(tmp_path, capsys):
    """A csv whose unlabelled rows have an empty label (the pool pretraining used): the probe
    fits the labelled rows; --label-fraction on it is one sentence."""
    root = write_image_folder(tmp_path / "data", classes=("a", "b"), per_class=4, size=20, split_dirs=("train", "val"))
    with open(os.path.join(root, "train.csv"), "w") as f:
        f.write("path,label\n" + "".join(f"train/{c}/{i}.png,{c if i < 2 else ''}\n" for c in "ab" for i in range(4)))
    with open(os.path.join(root, "val.csv"), "w") as f:
        f.write("".join(f"val/{c}/{i}.png,{c}\n" for c in "ab" for i in range(4)))
    base = [root, "--dataset", "csv", "-a", "resnet18", "-j", "0", "-b", "4", "--crop-size", "32", "--pretrained",
            "none", "--probe", "logreg"]
    args = main_lincls.finalize_args(main_lincls.get_args_parser().parse_args(base + ["--output-dir",
                                                                                      str(tmp_path / "u")]))
    subset, chosen = training_subset(build_dataset(args, "train"), args)
    assert subset.indices == [0, 1, 4, 5] and subset.targets == [0, 0, 1, 1]
    assert chosen == "the labelled ones; 4 have no label"
    stdout = lincls(base + ["--output-dir", str(tmp_path / "run")])
    assert "=> 4 training images (the labelled ones; 4 have no label)" in stdout
    assert json.load(open(tmp_path / "run" / "results.json"))["num_train_images"] == 4
    code = run_main(main_lincls.main, base + ["--label-fraction", "0.5", "--output-dir", str(tmp_path / "f")])
    err = capsys.readouterr().err
    assert code == 2 and "4 train images have no label" in err and "Traceback" not in err


def test_balanced_sampling_really_balances():
    targets = [0] * 90 + [1] * 9 + [2] * 1  # 90 : 9 : 1
    sampler = BalancedSampler(targets, 3, seed=0)
    sampler.set_epoch(0)
    draws = Counter(targets[i] for i, _ in sampler)
    assert sum(draws.values()) == 100
    assert all(20 <= draws[c] <= 47 for c in range(3)), draws  # ~33 each, not 90/9/1
    plain = ResumableSampler(len(targets), seed=0)
    assert Counter(targets[i] for i, _ in plain) == {0: 90, 1: 9, 2: 1}
    # many epochs: each class drawn a third of the time
    total = Counter()
    for epoch in range(30):
        sampler.set_epoch(epoch)
        total.update(targets[i] for i, _ in sampler)
    assert all(abs(total[c] / 3000 - 1 / 3) < 0.03 for c in range(3)), total
    # two ranks split one global draw (same for every rank count of the same seed)
    sampler.set_epoch(3)
    r0, r1 = BalancedSampler(targets, 3, 2, 0, seed=0), BalancedSampler(targets, 3, 2, 1, seed=0)
    r0.set_epoch(3), r1.set_epoch(3)
    whole = [i for i, _ in sampler]
    assert [i for i, _ in r0] == whole[0::2] and [i for i, _ in r1] == whole[1::2]
    torch.testing.assert_close(class_weights(targets, 3), torch.tensor([100 / 270, 100 / 27, 100 / 3]))
