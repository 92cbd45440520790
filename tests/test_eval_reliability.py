"""Evaluation that cannot quietly lie: unreadable images are left out (not replaced by the
next image), diverged (NaN/inf) checkpoints are refused, kNN top-5 is top-k for k < 5, a
one-class dataset is refused, and a resume refusal names the flag's real value."""
import argparse
import csv
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_main, run_script, write_image_folder

import main_knn
import main_lincls
from common.augment.transforms import eval_transform
from common.ckpt.resume import check_same_flags
from common.data.images import FileListDataset, image_folder, pil_loader
from common.data.transformed import TransformedDataset, drop_unreadable_collate
from common.errors import UserError
from common.eval.knn import knn_accuracy, knn_search
from common.nets.models import build_backbone, without_head
from knn.evaluate import knn_reports
from knn.reports import log_knn
from lincls.heads import backbone_state
from common.eval.logreg import fit_logistic_regression
from lincls.sanity import same_tensor, sanity_check

# resnet18 with the ImageNet stem at 32 px: a forward pass of a few images takes milliseconds
SMALL = ["-a", "resnet18", "--no-small-images", "--crop-size", "32", "-j", "0"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def garble(path):
    with open(path, "wb") as f:
        f.write(b"\x89PNG this is not an image at all")


def folder_with_unreadable_images(root):
    """train: classes a, b with 4 images each, a/1.png unreadable; val: b/2.png unreadable."""
    write_image_folder(root, classes=("a", "b"), per_class=4, size=20, split_dirs=("train", "val"))
    bad = [os.path.join(root, "train", "a", "1.png"), os.path.join(root, "val", "b", "2.png")]
    for p in bad:
        garble(p)
    return str(root), bad


def user_error(capsys, main, argv):
    code = run_main(main, argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------- 1. unreadable images

def test_dataset_leaves_unreadable_images_out_in_evaluation_and_names_the_stand_in_in_training(tmp_path, capsys):
    root = write_image_folder(tmp_path, classes=("a",), per_class=3, size=8, split_dirs=("",))
    paths = [os.path.join(root, "a", f"{i}.png") for i in range(3)]
    garble(paths[1])
    base = FileListDataset([(p, 0) for p in paths], ["a"])
    # training: image 2 stands in for image 1, and the warning says so
    img, _ = TransformedDataset(base)[1]
    assert np.array_equal(np.asarray(img), np.asarray(pil_loader(paths[2])))
    err = capsys.readouterr().err
    assert f"unreadable image {paths[1]!r}" in err and f"training on {paths[2]!r} in its place" in err
    # evaluation: None, which the collate drops, keeping the row marks
    ds = TransformedDataset(base, eval_transform(8), skip_unreadable=True)
    assert ds[1] is None and "leaving out unreadable image" in capsys.readouterr().err
    images, targets, kept = drop_unreadable_collate([(i, ds[i]) for i in range(3)])
    assert images.shape == (2, 3, 8, 8) and targets.tolist() == [0, 0] and kept.tolist() == [True, False, True]
    assert drop_unreadable_collate([(1, None)])[0] is None


def embed_alone(paths, seed=0):
    """What main_knn's --pretrained none backbone gives for each file alone (same init)."""
    torch.manual_seed(seed)
    model = build_backbone("resnet18", small_images=False).eval()
    tf = eval_transform(32)
    with torch.no_grad(), without_head(model):
        return np.stack([F.normalize(model(tf(pil_loader(p))[None]), dim=1)[0].numpy() for p in paths])


@pytest.mark.slow
def test_knn_export_rows_are_exactly_the_readable_images(tmp_path, capsys):
    root, bad = folder_with_unreadable_images(tmp_path / "data")
    out = tmp_path / "out"
    # batches of 3: the unreadable images fall inside a batch, not at its edge
    code = run_main(main_knn.main, [root] + SMALL + ["-b", "3", "--pretrained", "none", "--seed", "0",
                                                     "--export-embeddings", "--knn-k", "1", "3", "--output-dir",
                                                     str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    for split, bad_path in (("train", bad[0]), ("val", bad[1])):
        readable = [p for p, _ in image_folder(os.path.join(root, split)).samples if p != bad_path]
        rows = read_csv(out / "embeddings" / f"{split}.csv")
        feats = np.load(out / "embeddings" / f"{split}_features.npy").astype(np.float32)
        labels = np.load(out / "embeddings" / f"{split}_labels.npy")
        assert [r["path"] for r in rows] == readable and feats.shape == (7, 512)
        assert labels.tolist() == [int(r["label"]) for r in rows] == [0 if "/a/" in p else 1 for p in readable]
        # row i holds the features of the file it names, not of the next one
        np.testing.assert_allclose(feats, embed_alone(readable), atol=3e-3)
        assert read_csv(out / "embeddings" / f"{split}_unreadable.csv") == [
            {"path": bad_path, "label": "0" if split == "train" else "1", "class": "a" if split == "train" else "b"}]
        assert f"features {split}: 1 of 8 images are unreadable and left out: {bad_path!r}" in stdout
    res = json.load(open(out / "knn_results.json"))
    assert res["num_train"] == 7 and res["num_val"] == 7 and res["unreadable_val"] == 1
    # every readable val image counted once, the unreadable one not at all
    assert [int(r["support"]) for r in read_csv(out / "knn_per_class.csv")] == [4, 3]


@pytest.mark.slow
def test_two_gloo_workers_leave_out_the_same_images(tmp_path):
    # 8 images, 2 ranks: the unreadable one is in one rank's share only, so the ranks drop
    # different numbers of rows and the gather still has to line up
    root, bad = folder_with_unreadable_images(tmp_path / "data")
    base = [root] + SMALL + ["-b", "4", "--pretrained", "none", "--seed", "0", "--export-embeddings", "--knn-k", "3"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_main(main_knn.main, base + ["--output-dir", str(one)]) == 0
    run_script("main_knn.py", base + ["--output-dir", str(two), "--cpu", "--multiprocessing-distributed",
                                      "--nproc-per-node", "2", "--dist-url", "tcp://127.0.0.1:29541"])
    for split in ("train", "val"):
        emb1, emb2 = one / "embeddings", two / "embeddings"
        assert read_csv(emb1 / f"{split}.csv") == read_csv(emb2 / f"{split}.csv")
        assert len(read_csv(emb2 / f"{split}.csv")) == 7
        np.testing.assert_allclose(np.load(emb1 / f"{split}_features.npy").astype(np.float32),
                                   np.load(emb2 / f"{split}_features.npy").astype(np.float32), atol=2e-3)
        assert read_csv(emb1 / f"{split}_unreadable.csv") == read_csv(emb2 / f"{split}_unreadable.csv")


def test_lincls_evaluates_each_readable_val_image_once(tmp_path, capsys):
    root, bad = folder_with_unreadable_images(tmp_path / "data")
    out = tmp_path / "out"
    code = run_main(main_lincls.main, [root] + SMALL + ["-b", "4", "--pretrained", "none", "--probe", "logreg",
                                                        "--seed", "0", "--output-dir", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    final = json.load(open(out / "results.json"))["final"]
    assert final["num_samples"] == 7 and [c["support"] for c in final["per_class"]] == [4, 3]
    assert f"1 of 8 images are unreadable and left out: {bad[1]!r}" in stdout  # val
    assert f"1 of 8 images are unreadable and left out: {bad[0]!r}" in stdout  # the probe's training features


# ---------------------------------------------------------------- 2. non-finite weights

def diverged_checkpoint(path):
    torch.manual_seed(0)
    sd = build_backbone("resnet18", num_classes=128).state_dict()
    sd["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    sd["layer3.1.bn2.running_var"][:3] = float("inf")
    torch.save({"epoch": 5, "arch": "resnet18", "method": "moco", "args": {"small_images": False},
                "state_dict": {"module.encoder_q." + k: v for k, v in sd.items()}}, path)
    return str(path)


def test_diverged_checkpoint_is_refused_naming_the_tensor(tmp_path, capsys):
    ckpt = diverged_checkpoint(tmp_path / "diverged.pth.tar")
    root = write_image_folder(tmp_path / "data", per_class=2, size=8, split_dirs=("train", "val"))
    for name, main in (("lincls", main_lincls.main), ("knn", main_knn.main)):
        err = user_error(capsys, main, [root] + SMALL + ["-b", "2", "--pretrained", ckpt, "--output-dir",
                                                         str(tmp_path / name)])
        assert "non-finite (NaN/inf) weights in 2 of 120 tensors, e.g. 'layer2.0.conv1.weight' (1 of its" in err, err
        assert "earlier checkpoint" in err and len(err.strip().splitlines()) == 1


def test_sanity_check_treats_an_untouched_nan_as_unchanged():
    model = build_backbone("resnet18", num_classes=2)
    with torch.no_grad():
        model.layer1[0].conv1.weight[0, 0, 0, 0] = float("nan")
    reference = backbone_state(model)
    sanity_check(model, reference)  # torch.equal(NaN, NaN) alone is False
    with torch.no_grad():
        model.layer1[0].conv1.weight[0, 0, 0, 1] += 1.0
    with pytest.raises(RuntimeError, match="1 tensors differ"):
        sanity_check(model, reference)
    assert not same_tensor(torch.tensor([float("nan"), 1.0]), torch.tensor([1.0, float("nan")]))


# ---------------------------------------------------------------- 3. kNN top-5 with k < 5

def ladder_problem():
    """8 classes, one training image each (e_c); query i is closest to class i, then i+1,
    then i+2, and orthogonal to the rest. Even queries are labelled i+1 (the second
    nearest), odd ones i+3 (no vote among the 3 nearest)."""
    eye = torch.eye(8)
    train, train_l = eye, torch.arange(8)
    query = torch.stack([eye[i] + 0.5 * eye[(i + 1) % 8] + 0.25 * eye[(i + 2) % 8] for i in range(8)])
    val_l = torch.tensor([(i + 1) % 8 if i % 2 == 0 else (i + 3) % 8 for i in range(8)])
    return train, train_l, F.normalize(query, dim=1), val_l


def test_knn_top5_is_top_k_below_five_neighbours(capsys):
    train, train_l, query, val_l = ladder_problem()
    # one neighbour votes for one class: "top-5" is top-1 (0 %), not padded with classes without votes
    assert knn_accuracy(train, train_l, query, val_l, 8, k=1) == {"knn_top1": 0.0}
    # three neighbours: the second nearest class is in the top 3 for the even queries only
    assert knn_accuracy(train, train_l, query, val_l, 8, k=3) == {"knn_top1": 0.0, "knn_top3": 50.0}
    assert set(knn_accuracy(train, train_l, query, val_l, 8, k=5)) == {"knn_top1", "knn_top5"}
    top_sim, top_idx = knn_search(train, query, 3)
    classes = [f"c{c}" for c in range(8)]
    results, _ = knn_reports(top_sim, top_idx, train_l, val_l, classes, [1, 3], 0.07)
    assert (results[1]["top5"], results[1]["top5_k"]) == (0.0, 1)
    assert (results[3]["top5"], results[3]["top5_k"]) == (50.0, 3)
    log_knn(results, classes, 0.07)
    out = capsys.readouterr().out
    assert "k=1 T=0.07: top-1 0.00  top-1 0.00" in out and "k=3 T=0.07: top-1 0.00  top-3 50.00" in out


# ---------------------------------------------------------------- 4. one class

def test_one_class_dataset_is_refused(tmp_path, capsys):
    root = write_image_folder(tmp_path / "data", classes=("cat",), per_class=2, size=8, split_dirs=("train", "val"))
    for i, probe in enumerate(("logreg", "sgd")):
        err = user_error(capsys, main_lincls.main, [root] + SMALL + ["-b", "2", "--pretrained", "none", "--probe",
                                                                     probe, "--output-dir", str(tmp_path / f"o{i}")])
        assert "only one class ('cat'); a classifier needs at least two classes" in err
    with pytest.raises(UserError, match="at least two classes"):
        fit_logistic_regression(torch.randn(4, 3), torch.zeros(4), 1)


# ---------------------------------------------------------------- 5. resume message

def test_resume_refusal_shows_the_flag_value_not_on():
    args = argparse.Namespace(label_fraction=0.5, head_bn=True, subset_seed=0)
    with pytest.raises(UserError, match=r"trained with --label-fraction 1\.0 but this run has --label-fraction 0\.5"):
        check_same_flags({"label_fraction": 1.0}, args, ["--label-fraction"], "ck.pth.tar")
    with pytest.raises(UserError, match=r"trained with --subset-seed 1 but this run has --subset-seed 0;"):
        check_same_flags({"subset_seed": 1}, args, ["--subset-seed"], "ck.pth.tar")
    with pytest.raises(UserError, match="trained with --head-bn off but this run has --head-bn on"):
        check_same_flags({"head_bn": False}, args, ["--head-bn"], "ck.pth.tar")
