"""Hierarchical labels (lincls/hierarchy.py, main_lincls.py and main_knn.py with
--hierarchy-depth): the label tree from nested folders and from a csv, one backbone pass for
every head, frozen backbone, resume, DDP, kNN per level, and one-sentence errors for bad trees
(per-level metrics and consistent decoding: test_label_tree.py)."""
import argparse
import codecs
import colorsys
import csv
import json
import os
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from test_lincls import lincls, load, one_and_two_gloo_workers, resumed_equals_straight, run_in_process

import main_knn
import main_lincls
from bench.hierarchy import FAMILY, write_data
from bench.util import write_mnist_layout
from common.data.images import csv_manifest
from common.data.subsets import load_subset, save_subset, stratified_subset
from common.data.synthetic import SyntheticPatterns
from common.errors import UserError
from common.eval.hierarchical_data import csv_samples, hierarchical_dataset
from common.eval.knn import knn_predict
from common.eval.label_tree import consistency_rate
from common.nets.models import build_backbone
from lincls.balance import BalancedSampler, class_weights
from lincls.data import training_subset
from lincls.heads import build_classifier
from lincls.hierarchy import LevelHeads

# family = hue, type = pattern; 'stripes' is a type of both families (two classes, told
# apart by their path); 20 : 6 : 3 : 1 training images, 20:1 between the extreme classes
HUES = {"red": 0.0, "blue": 0.62}
PATTERNS = {"stripes": "hstripes", "disc": "disc", "rings": "rings"}
LEAVES = (("red", "stripes", 20), ("red", "disc", 6), ("blue", "stripes", 3), ("blue", "rings", 1))
VAL_PER_CLASS = 4
TINY = ["-a", "resnet18", "--no-small-images", "-j", "0", "--crop-size", "16", "-b", "16", "--lr", "0.1",
        "--seed", "3", "-p", "100"]


def draw(family: str, kind: str, rng: np.random.Generator, size: int = 16) -> Image.Image:
    mask = SyntheticPatterns.pattern_mask(rng, size, PATTERNS[kind])[..., None]
    fg = np.array(colorsys.hsv_to_rgb(HUES[family], rng.uniform(0.6, 1), rng.uniform(0.6, 1)), dtype=np.float32)
    img = np.where(mask, fg, np.float32(rng.uniform(0, 0.3))) + rng.normal(0, 0.05, (size, size, 3))
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def tree_data(tmp_path_factory) -> str:
    """root/{train,val}/<family>/<type>/<i>.png and root/{train,val}.csv (`path,family,type`)
    listing the same files."""
    root = tmp_path_factory.mktemp("hierarchy")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        rows = [("path", "family", "type")]
        for family, kind, n in LEAVES:
            folder = root / split / family / kind
            os.makedirs(folder)
            for i in range(n if split == "train" else VAL_PER_CLASS):
                draw(family, kind, rng).save(folder / f"{i}.png")
                rows.append((f"{split}/{family}/{kind}/{i}.png", family, kind))
        with open(root / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
    return str(root)


def data_args(root: str, dataset: str = "imagefolder") -> argparse.Namespace:
    return argparse.Namespace(in_channels=None, data=str(root), dataset=dataset, hierarchy_depth=2)


def lincls_args(root: str, out) -> argparse.Namespace:
    return main_lincls.finalize_args(main_lincls.get_args_parser().parse_args(
        [root, "--hierarchy-depth", "2", "--pretrained", "none", "--output-dir", str(out)] + TINY))


# ---------------------------------------------------------------- the tree and the data

def test_folders_and_csv_give_the_same_tree(tree_data):
    folders = hierarchical_dataset(data_args(tree_data), "train")
    table = hierarchical_dataset(data_args(tree_data, "csv"), "train")
    tree = folders.tree
    assert tree.classes == [["blue", "red"], ["blue/rings", "blue/stripes", "red/disc", "red/stripes"]]
    assert table.tree.classes == tree.classes and folders.classes == tree.leaves
    assert tree.level_names == ["level1", "level2"] and table.tree.level_names == ["family", "type"]
    assert tree.parents[1].tolist() == [0, 0, 1, 1]
    # every image gets the same deepest class both ways; 'stripes' is two classes
    by_path = {os.path.normpath(p): t for p, t in table.samples}
    assert {os.path.normpath(p): t for p, t in folders.samples} == by_path
    assert Counter(folders.targets) == {3: 20, 2: 6, 1: 3, 0: 1}
    assert Counter(tree.level_targets(folders.targets, 0).tolist()) == {1: 26, 0: 4}
    val = hierarchical_dataset(data_args(tree_data, "csv"), "val", table.tree)
    assert val.classes == tree.leaves and Counter(val.targets) == {c: VAL_PER_CLASS for c in range(4)}


def test_label_fraction_is_stratified_on_the_deepest_level_and_balancing_picks_a_level(tree_data, tmp_path):
    args = lincls_args(tree_data, tmp_path)
    args.label_fraction = 0.5
    train = hierarchical_dataset(args, "train")
    subset, _ = training_subset(train, args)
    assert Counter(subset.targets) == {3: 10, 2: 3, 1: 2, 0: 1}  # round(n / 2) of each deepest class
    # oversampling at level 1 evens the families out, at level 2 the four types
    for level, n in ((0, 2), (1, 4)):
        targets = train.tree.level_targets(train.targets, level).tolist()
        drawn = Counter()
        for epoch in range(20):
            sampler = BalancedSampler(targets, n, seed=0)
            sampler.set_epoch(epoch)
            drawn.update(targets[i] for i, _ in sampler)
        assert all(abs(drawn[c] / sum(drawn.values()) - 1 / n) < 0.05 for c in range(n)), (level, drawn)
    torch.testing.assert_close(class_weights(train.tree.level_targets(train.targets, 0).tolist(), 2),
                               torch.tensor([30 / 8, 30 / 52]))


# ---------------------------------------------------------------- one head per level

def test_one_head_per_level_and_one_backbone_pass(tree_data, tmp_path):
    args = lincls_args(tree_data, tmp_path)
    args.head = "mlp"
    args.head_bn = True
    model, _, _ = build_classifier(args, [2, 4])
    assert isinstance(model.fc[1], LevelHeads) and len(model.fc[1].heads) == 2  # --head-bn: one BN for both
    assert [h[-1].out_features for h in model.fc[1].heads] == [2, 4]
    calls = []
    model.layer4.register_forward_hook(lambda *_: calls.append(1))
    model.eval()
    out = model(torch.randn(3, 3, 16, 16))
    assert out.shape == (3, 6) and len(calls) == 1
    # each level's logits come from its own head on the same features
    with torch.no_grad():
        feats = torch.flatten(model.avgpool(model.layer4(model.layer3(model.layer2(model.layer1(
            model.maxpool(model.relu(model.bn1(model.conv1(torch.ones(1, 3, 16, 16)))))))))), 1)
        level2 = model.fc[1].heads[1](model.fc[0](feats))
        torch.testing.assert_close(model(torch.ones(1, 3, 16, 16))[:, 2:], level2)


@pytest.mark.parametrize("arch,width", [("vit_tiny", 64), ("mobilenet_v3_small", 1024)])
def test_heads_per_level_on_another_family_read_its_width(tree_data, tmp_path, arch, width):
    """A wrapped family (`body` + `fc`): one head per level on its own feature width, each
    level's logits that head on the body's pooled features."""
    args = lincls_args(tree_data, tmp_path)
    args.arch = arch
    model, _, _ = build_classifier(args, [2, 4])
    assert [(h.in_features, h.out_features) for h in model.fc.heads] == [(width, 2), (width, 4)]
    model.eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        feats = model.body(x)
        torch.testing.assert_close(model(x), torch.cat([model.fc.heads[0](feats), model.fc.heads[1](feats)], 1))


@pytest.mark.slow
def test_a_vit_trains_heads_per_level(tree_data, tmp_path):
    out = tmp_path / "run"
    stdout = lincls([tree_data, "--hierarchy-depth", "2", "--pretrained", "none", "--epochs", "1",
                     "--output-dir", str(out)] + TINY[:1] + ["vit_tiny"] + TINY[2:])
    assert "vit_tiny from" in stdout and "one linear head per level, 2 level1 classes, 4 level2 classes" in stdout
    assert "sanity check passed" in stdout and "=> epoch 0 val level 2 (level2): acc1" in stdout
    sd = load(out / "checkpoint_last.pth.tar")["state_dict"]
    assert sd["module.fc.heads.0.weight"].shape == (2, 64) and sd["module.fc.heads.1.weight"].shape == (4, 64)


# ---------------------------------------------------------------- end to end

def simclr_checkpoint(path) -> dict:
    """A SimCLR-layout checkpoint with non-default BN statistics, so loading them shows."""
    torch.manual_seed(1)
    net = build_backbone("resnet18", num_classes=16)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
    sd = {f"module.encoder.{k}": v for k, v in net.state_dict().items()}
    torch.save({"method": "simclr", "arch": "resnet18", "epoch": 1, "state_dict": sd}, path)
    return {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}


@pytest.mark.slow
def test_frozen_backbone_heads_per_level_and_every_metric_file(tree_data, tmp_path):
    expected = simclr_checkpoint(tmp_path / "simclr.pth.tar")
    out = tmp_path / "run"
    stdout = lincls([tree_data, "--hierarchy-depth", "2", "--pretrained", str(tmp_path / "simclr.pth.tar"),
                     "--epochs", "2", "--cos", "--head-bn", "--output-dir", str(out)] + TINY)
    assert "one linear head per level, 2 level1 classes, 4 level2 classes" in stdout
    assert "sanity check passed: all 120 backbone tensors" in stdout
    for epoch in (0, 1):  # one line per level, then the whole-path line
        assert f"=> epoch {epoch} val level 1 (level1): acc1" in stdout
        assert f"=> epoch {epoch} val level 2 (level2): acc1" in stdout and "macro_f1" in stdout
        assert f"=> epoch {epoch} val: independent decoding: path_acc1" in stdout
    sd = load(out / "checkpoint_last.pth.tar")["state_dict"]
    for k, v in expected.items():
        assert torch.equal(sd["module." + k], v), k
    assert sd["module.fc.1.heads.0.weight"].shape == (2, 512) and sd["module.fc.1.heads.1.weight"].shape == (4, 512)

    results = json.load(open(out / "results.json"))
    final = results["final"]
    assert results["hierarchy"]["classes"][1] == ["blue/rings", "blue/stripes", "red/disc", "red/stripes"]
    assert [r["name"] for r in final["levels"]] == ["level1", "level2"] and final["decoding"] == "independent"
    assert results["best_acc1"] == max(json.loads(line)["path_acc1"] for line in open(out / "metrics.jsonl"))
    for level, r in zip((1, 2), final["levels"]):
        conf = np.array(r["confusion"])
        assert conf.sum() == 4 * VAL_PER_CLASS
        assert r["acc1"] == pytest.approx(100 * np.trace(conf) / conf.sum())
        rows = list(csv.reader(open(out / f"confusion_matrix_level{level}.csv")))
        assert np.array([[int(x) for x in row[1:]] for row in rows[1:]]).tolist() == conf.tolist()
        per_class = list(csv.DictReader(open(out / f"per_class_level{level}.csv")))
        assert np.mean([float(p["f1"]) for p in per_class]) == pytest.approx(r["macro_f1"], abs=1e-3)
        assert os.path.isfile(out / f"per_class_level{level}_best.csv")
    # consistency and whole-path top-1 from the level confusion matrices cannot be checked,
    # but they must agree with each other: a path is right only if every level is
    assert final["path_acc1"] <= min(r["acc1"] for r in final["levels"]) + 1e-9
    record = [json.loads(line) for line in open(out / "metrics.jsonl")][-1]
    assert record["level2_macro_f1"] == pytest.approx(final["levels"][1]["macro_f1"])

    # --evaluate with --consistent: the trained heads, decoded under their parent
    evaluation = tmp_path / "eval"
    lincls([tree_data, "--hierarchy-depth", "2", "--evaluate", "--consistent", "--resume",
            str(out / "checkpoint_last.pth.tar"), "--output-dir", str(evaluation)] + TINY)
    ev = json.load(open(evaluation / "evaluation.json"))
    assert ev["decoding"] == "top-down" and ev["consistency_rate"] == 100.0
    assert ev["independent_path_acc1"] == pytest.approx(final["path_acc1"])
    assert ev["levels"][0]["confusion"] == final["levels"][0]["confusion"]  # level 1 decides alone either way
    assert os.path.isfile(evaluation / "confusion_matrix_level2_eval.csv")


@pytest.mark.slow
def test_resume_equals_uninterrupted_with_a_csv_tree(tree_data, tmp_path, capsys):
    # MLP heads (dropout), weighted levels, half the labels, level-1 oversampling and class weights
    base = [tree_data, "--dataset", "csv", "--hierarchy-depth", "2", "--pretrained", "none", "--head", "mlp",
            "--level-weights", "0.5", "1", "--label-fraction", "0.5", "--balanced-sampling", "--balance-level", "1",
            "--class-weights", "--consistent", "path", "--schedule", "1", "--head-bn"] + TINY
    straight, split = tmp_path / "straight", tmp_path / "split"
    resumed_equals_straight(base, straight, split)
    ra = json.load(open(straight / "results.json"))
    assert ra["final"] == json.load(open(split / "results.json"))["final"]
    assert ra["final"]["decoding"] == "path" and ra["final"]["consistency_rate"] == 100.0
    assert [r["name"] for r in ra["final"]["levels"]] == ["family", "type"]
    # resuming as a flat classifier is refused
    code, err = run_in_process([tree_data, "--dataset", "csv", "--pretrained", "none", "--head", "mlp", "--head-bn",
                                "--epochs", "3",
                                "--output-dir", str(split), "--resume", "auto"] + TINY, capsys)
    assert code == 2 and "was trained with --hierarchy-depth 2 but this run has --hierarchy-depth 0" in err


@pytest.mark.slow
def test_two_gloo_workers_match_one_process(tree_data, tmp_path):
    args = [tree_data, "--hierarchy-depth", "2", "--pretrained", "none", "--epochs", "1"] + TINY
    a, b = one_and_two_gloo_workers(args, tmp_path, 29541)
    heads = [k for k in a["state_dict"] if k.startswith("module.fc.heads.")]
    assert len(heads) == 4
    for k in heads:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=1e-4, atol=1e-5)
    ra, rb = json.load(open(tmp_path / "one" / "results.json")), json.load(open(tmp_path / "two" / "results.json"))
    for la, lb in zip(ra["final"]["levels"], rb["final"]["levels"]):
        assert la["confusion"] == lb["confusion"]  # every val image evaluated once, at every level


@pytest.mark.slow
def test_knn_evaluates_every_level(tree_data, tmp_path):
    out = tmp_path / "knn"
    main_knn.main([tree_data, "--dataset", "csv", "--hierarchy-depth", "2", "--pretrained", "none", "-a", "resnet18",
                   "--no-small-images", "--crop-size", "16", "-j", "0", "-b", "32", "--knn-k", "5", "20",
                   "--export-embeddings", "--output-dir", str(out)])
    res = json.load(open(out / "knn_results.json"))
    assert [r["name"] for r in res["levels"]] == ["family", "type"]
    emb = out / "embeddings"
    train_f, train_l = torch.from_numpy(np.load(emb / "train_features.npy")), torch.from_numpy(np.load(emb / "train_labels.npy"))
    val_f, val_l = torch.from_numpy(np.load(emb / "val_features.npy")), torch.from_numpy(np.load(emb / "val_labels.npy"))
    tree = hierarchical_dataset(data_args(tree_data, "csv"), "train").tree
    preds = []
    for level, n in enumerate(tree.sizes):  # the neighbours vote with their class at that level
        scores = knn_predict(train_f.float(), tree.level_targets(train_l, level), val_f.float(), n, k=5)
        truth = tree.level_targets(val_l, level)
        assert res["levels"][level]["knn"]["5"]["top1"] == pytest.approx(
            100 * (scores.argmax(1) == truth).float().mean().item(), abs=1e-3)
        preds.append(scores.argmax(1))
    assert res["path"]["5"]["consistency_rate"] == pytest.approx(consistency_rate(preds, tree))
    assert os.path.isfile(out / "knn_per_class_level2_k20.csv")


# ---------------------------------------------------------------- bad input

def test_bad_trees_are_one_sentence(tree_data, tmp_path, capsys):
    def refused(root, *extra):
        code, err = run_in_process([str(root), "--hierarchy-depth", "2", "--pretrained", "none",
                                    "--output-dir", str(tmp_path / "o")] + list(extra) + TINY, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        return err

    # mixed depths: one branch of the folder tree has no level-2 folder
    mixed = tmp_path / "mixed"
    for rel in ("train/red/stripes/0.png", "train/red/stripes/1.png", "train/blue/0.png"):
        os.makedirs(mixed / os.path.dirname(rel), exist_ok=True)
        draw("red", "disc", np.random.default_rng(0)).save(mixed / rel)
    err = refused(mixed)
    assert "--hierarchy-depth 2 expects every image 2 folders below" in err and "blue/0.png' is 1 deep" in err

    # csv rows: a missing level, then a type under two families given without its family
    def manifest(name, rows):
        path = tmp_path / name
        path.write_text("path,family,type\n" + "".join(f"{r}\n" for r in rows))
        return path

    train = os.path.join(tree_data, "train")
    ok = [f"{train}/red/stripes/0.png,red,stripes", f"{train}/blue/stripes/0.png,blue,stripes",
          f"{train}/red/disc/0.png,red,disc"]
    err = refused(manifest("missing.csv", ok + [f"{train}/red/disc/1.png,red,"]), "--dataset", "csv")
    assert "row 5 of" in err and "has no type label" in err
    err = refused(manifest("ambiguous.csv", ok + [f"{train}/red/stripes/1.png,,stripes"]), "--dataset", "csv")
    assert "gives type 'stripes' without its family, but 'stripes' appears under 2 parents (blue, red)" in err
    # a type with one parent may leave its family out: it is taken from the other rows
    implied = hierarchical_dataset(data_args(manifest("implied.csv", ok + [f"{train}/red/disc/1.png,,disc"]), "csv"),
                                   "train")
    assert implied.samples[-1][1] == implied.classes.index("red/disc")

    # flags that only make sense with a hierarchy, or with the right number of levels
    err = refused(tree_data, "--level-weights", "1")
    assert "--level-weights [1.0] must give 2 non-negative weights" in err
    code, err = run_in_process([tree_data, "--pretrained", "none", "--consistent", "--output-dir", str(tmp_path / "o")]
                               + TINY, capsys)
    assert code == 2 and "--consistent only applies to hierarchical labels; add --hierarchy-depth N" in err
    with pytest.raises(UserError, match="use --dataset imagefolder or --dataset csv instead of synthetic"):
        hierarchical_dataset(data_args(tree_data, "synthetic"), "train")


def test_csv_tree_with_a_byte_order_mark_or_not_utf8(tree_data, tmp_path, capsys):
    """Excel's "CSV UTF-8" starts with a BOM (the header must still name the levels); its
    plain "CSV" is cp1252, which is one sentence naming the byte, not a UnicodeDecodeError."""
    train = os.path.join(tree_data, "train")
    rows = ["path,family,type", f"{train}/red/stripes/0.png,red,stripes", f"{train}/blue/rings/0.png,blue,rings"]
    bom = tmp_path / "bom.csv"
    bom.write_bytes(codecs.BOM_UTF8 + "\r\n".join(rows).encode() + b"\r\n")
    samples, names = csv_samples(str(bom), 2)
    assert names == ["family", "type"] and [labels for _, labels in samples] == [("red", "stripes"), ("blue", "rings")]

    latin = tmp_path / "latin.csv"
    latin.write_bytes(("\n".join(rows) + f"\n{train}/red/disc/0.png,rouge,disque_été\n").encode("cp1252"))
    offset = len(("\n".join(rows) + f"\n{train}/red/disc/0.png,rouge,disque_").encode())
    with pytest.raises(UserError) as e:
        csv_samples(str(latin), 2)
    assert str(e.value) == (f"csv manifest {str(latin)!r} is not UTF-8 text (byte 0xe9 at offset {offset}, line 4); "
                            f"save it as UTF-8 (in Excel: Save As > CSV UTF-8)")
    code, err = run_in_process([str(latin), "--dataset", "csv", "--hierarchy-depth", "2", "--pretrained", "none",
                                "--output-dir", str(tmp_path / "o")] + TINY, capsys)
    assert code == 2 and err.strip() == f"{os.path.basename(sys.argv[0])}: error: {e.value}", err


def test_fashion_mnist_benchmark_data_is_imbalanced_and_shared_by_every_method(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 50).astype(np.uint8)
    write_mnist_layout(str(tmp_path / "fmnist"), rng.integers(0, 255, (500, 28, 28), dtype=np.uint8), labels,
                       rng.integers(0, 255, (100, 28, 28), dtype=np.uint8), labels[::5])
    args = argparse.Namespace(data=str(tmp_path / "fmnist"), seed=0, max_per_class=40, imbalance=20.0,
                              test_per_class=3)
    sizes = write_data(args, str(tmp_path / "out"))
    assert max(sizes.values()) == 40 and min(sizes.values()) == 2 and len(set(sizes.values())) == 10
    tree = hierarchical_dataset(data_args(tmp_path / "out" / "tree", "csv"), "train")
    assert tree.tree.classes[0] == ["footwear", "other", "tops"] and len(tree) == sum(sizes.values())
    assert Counter(tree.tree.level_targets(tree.targets, 0).tolist()) == {
        tree.tree.classes[0].index(f): sum(n for t, n in sizes.items() if FAMILY[t] == f) for f in FAMILY.values()}
    # the per-level networks read the same files in the same order, so a label subset drawn on the
    # tree (stratified on the deepest level) is valid for them: every method gets the same images
    path = str(tmp_path / "subset.json")
    save_subset(path, stratified_subset(tree.targets, 0.5), tree, 0.5, 0)
    for level in ("family", "type"):
        flat = csv_manifest(str(tmp_path / "out" / level / "train.csv"))
        assert [flat.path(i) for i in range(len(flat))] == [tree.path(i) for i in range(len(tree))]
        assert load_subset(path, flat) == stratified_subset(tree.targets, 0.5)
        val = csv_manifest(str(tmp_path / "out" / level / "val.csv"))
        per_class = {name: 3 * (1 if level == "type" else list(FAMILY.values()).count(name)) for name in val.classes}
        assert Counter(val.classes[t] for t in val.targets) == per_class  # a balanced test set
