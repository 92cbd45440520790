"""main_knn.py end to end: --whiten, label fractions, pretrained > untrained with export and
retrieval, gloo workers, clear errors, unlabelled and partly labelled images, embedding tables."""
import csv
import json
import os
import sys

import numpy as np
import pytest
from conftest import LEARNING_KNN_IMAGES, SYNTHETIC, run_script, write_image_folder
from PIL import Image

import main_knn
from common.data.datasets import build_dataset
from common.data.subsets import stratified_subset
from common.extras import available

# the moco_pretrained run's data, fewer images: kNN only needs a forward pass
DATA = SYNTHETIC + ["--synthetic-size", "512", "-b", "64", "-p", "1000"]


@pytest.mark.slow
def test_whiten_flag_votes_in_the_whitened_space_and_says_so(tmp_path, capsys):
    out = tmp_path / "white"
    main_knn.main(DATA + ["--pretrained", "none", "--synthetic-size", "128", "--whiten", "16", "--output-dir",
                          str(out), "--knn-k", "5"])
    assert "PCA-whitened features: the first 16 principal axes of the 128 train features" in capsys.readouterr().out
    info = results(out)
    assert info["whiten"] == 16 and 0 <= info["knn"]["5"]["top1"] <= 100
    assert info["num_voters"] == info["num_train"] == 128 and info["label_fraction"] == 1.0


@pytest.mark.slow
def test_label_fraction_votes_with_main_lincls_subset_and_whitens_on_every_train_image(tmp_path, capsys):
    """A quarter of the labels vote (the images main_lincls.py --label-fraction 0.25 draws);
    the whitening is fitted on all 128 train images: 64 axes, where the 32 voters alone
    could give at most 31."""
    out = tmp_path / "quarter"
    argv = DATA + ["--pretrained", "none", "--synthetic-size", "128", "--knn-k", "5", "--label-fraction", "0.25"]
    main_knn.main(argv + ["--whiten", "64", "--output-dir", str(out)])
    log = capsys.readouterr().out
    assert "kNN votes with 32 of the 128 train images (label fraction 0.25" in log
    info = results(out)
    assert (info["num_voters"], info["num_train"], info["whiten"], info["label_fraction"]) == (32, 128, 64, 0.25)
    args = main_knn.finalize_args(main_knn.get_args_parser().parse_args(argv + ["--output-dir", str(tmp_path / "x")]))
    train = build_dataset(args, "train")
    with open(out / "label_subset.json") as f:
        assert json.load(f)["indices"] == stratified_subset(train.targets, 0.25, seed=0)
    # the saved subset is reused as it is, and gives the same vote
    again = tmp_path / "again"
    main_knn.main(DATA + ["--pretrained", "none", "--synthetic-size", "128", "--knn-k", "5", "--whiten", "64",
                          "--label-subset", str(out / "label_subset.json"), "--output-dir", str(again)])
    assert results(again)["knn"]["5"]["top1"] == info["knn"]["5"]["top1"]
    assert results(again)["num_voters"] == 32


def results(folder):
    with open(os.path.join(folder, "knn_results.json")) as f:
        return json.load(f)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_pretrained_beats_the_untrained_network_with_export_and_retrieval(moco_pretrained, moco_untrained,
                                                                         tmp_path):
    query = tmp_path / "mine.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 60, 3), dtype=np.uint8)).save(query)
    pre, rnd = tmp_path / "pretrained", tmp_path / "random"
    # -a and the stem come from the checkpoint
    proc = run_script("main_knn.py", DATA + ["--pretrained", moco_pretrained, "--output-dir", str(pre),
                                             "--export-embeddings", "--retrieval", "5", "--retrieval-k", "6",
                                             "--retrieval-split", "train", "--grid-rows", "3",
                                             "--query", str(query), "-p", "2"])
    assert "features train [" in proc.stdout and "img/s" in proc.stdout and "eta" in proc.stdout
    assert "per-class recall" in proc.stdout
    a = results(pre)
    assert a["num_train"] == 512 and a["num_val"] == 128 and a["feature_dim"] == 512
    per_class = read_csv(pre / "knn_per_class.csv")
    assert len(per_class) == 8 and sum(int(r["support"]) for r in per_class) == 128
    recalls = [float(r["recall_k20"]) for r in per_class]
    assert np.mean(recalls) == pytest.approx(a["knn"]["20"]["macro_recall"], abs=1e-3)

    # export: rows line up across features, labels and the csv
    emb = pre / "embeddings"
    for split, n in (("train", 512), ("val", 128)):
        feats, labels = np.load(emb / f"{split}_features.npy"), np.load(emb / f"{split}_labels.npy")
        rows = read_csv(emb / f"{split}.csv")
        assert feats.shape == (n, 512) and feats.dtype == np.float16 and labels.shape == (n,)
        np.testing.assert_allclose(np.linalg.norm(feats.astype(np.float32), axis=1), 1.0, atol=2e-3)
        assert [int(r["label"]) for r in rows] == labels.tolist() == [i % 8 for i in range(n)]
        assert rows[7]["path"] == f"synthetic[{0 if split == 'train' else 1}:7]" and rows[7]["class"] == "hue315"

    # retrieval: 5 drawn + 1 own query, 3 rows per grid -> 2 grids of 7 columns of 32 px (+2 px padding)
    ret = pre / "retrieval"
    sizes = [Image.open(ret / f"grid_{i:03d}.png").size for i in range(2)]
    assert sizes == [(7 * 34 + 2, 3 * 34 + 2)] * 2
    caps = read_csv(ret / "captions.csv")
    assert len(caps) == 6 * 7
    train_queries = [c for c in caps if c["role"] == "query" and c["split"] == "train"]
    assert len(train_queries) == 5
    for q in train_queries:  # a training image queried against the training set finds itself first
        first = next(c for c in caps if c["grid"] == q["grid"] and c["row"] == q["row"] and c["column"] == "1")
        assert first["index"] == q["index"] and first["path"] == q["path"] and float(first["similarity"]) > 0.999
    own = [c for c in caps if c["split"] == "query"]
    assert len(own) == 1 and own[0]["path"] == str(query)
    sims = [float(c["similarity"]) for c in caps if c["grid"] == own[0]["grid"] and c["row"] == own[0]["row"]
            and c["role"] != "query"]
    assert len(sims) == 6 and sims == sorted(sims, reverse=True)
    # the grid's query cell is the query image itself (resized + centre-cropped, not normalised)
    grid = np.asarray(Image.open(ret / "grid_000.png").convert("RGB"))
    q0 = int(caps[0]["index"])
    from common.data.synthetic import SyntheticPatterns
    expect = np.asarray(SyntheticPatterns(512)[q0][0])
    assert np.abs(grid[2:34, 2:34].astype(int) - expect.astype(int)).max() <= 1

    # last, so a weak checkpoint does not hide the checks above: pretraining must have learned
    # something kNN sees, against the same run at lr 0 (conftest.moco_untrained), on the
    # learning tests' 2,048-image bank and 512 val images (in-process: no import cost).
    # Measured over fixture seeds 1-6 (2 CPU cores, torch 2.14.1): kNN k=20 top-1 76.8-84.6
    # against 62.5-72.1, gains 12.5-19.9 (mean 16.1, sd 2.9); margin 8. Against --pretrained
    # none (79.3) the gain is -2.5..+5.3: a fresh network's identity BatchNorm statistics are
    # another model, not the control for what training bought.
    big = SYNTHETIC + ["--synthetic-size", str(LEARNING_KNN_IMAGES), "-b", "256", "-p", "1000"]
    main_knn.main(big + ["--pretrained", moco_pretrained, "--output-dir", str(pre / "big")])
    main_knn.main(big + ["--pretrained", moco_untrained, "--output-dir", str(rnd)])
    learned, untrained = results(pre / "big")["knn"], results(rnd)["knn"]
    for k in ("20", "200"):
        print(f"kNN k={k}: pretrained top-1 {learned[k]['top1']:.2f} top-5 {learned[k]['top5']:.2f} | "
              f"untrained top-1 {untrained[k]['top1']:.2f} top-5 {untrained[k]['top5']:.2f}")
    assert learned["20"]["top1"] > untrained["20"]["top1"] + 8.0, (learned["20"], untrained["20"])


@pytest.mark.slow
def test_two_gloo_workers_give_the_single_process_features(tmp_path):
    base = SYNTHETIC + ["--synthetic-size", "72", "-b", "16", "--pretrained", "none", "--export-embeddings",
                        "--knn-k", "5", "20"]
    one, two = tmp_path / "one", tmp_path / "two"
    main_knn.main(base + ["--output-dir", str(one)])
    proc = run_script("main_knn.py", base + ["--output-dir", str(two), "--cpu", "--multiprocessing-distributed",
                                             "--nproc-per-node", "2", "--dist-url", "tcp://127.0.0.1:29531"])
    assert "2 process(es)" in proc.stdout
    for split in ("train", "val"):  # 72 / 18 images: odd shares, the sampler pads and the gather unpads
        f1, f2 = (np.load(d / "embeddings" / f"{split}_features.npy").astype(np.float32) for d in (one, two))
        assert f1.shape == f2.shape
        np.testing.assert_allclose(f1, f2, atol=2e-3)
        assert np.array_equal(np.load(one / "embeddings" / f"{split}_labels.npy"),
                              np.load(two / "embeddings" / f"{split}_labels.npy"))
    assert results(one)["knn"]["5"]["top1"] == results(two)["knn"]["5"]["top1"]


# ---------------------------------------------------------------- clear errors (in-process, fast)

def user_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main_knn.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: " in err
    return err


def flat_folder(root, n=6):
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(os.path.join(root, f"{i}.png"))
    return str(root)


def test_clear_errors(capsys, tmp_path):
    small = SYNTHETIC + ["--synthetic-size", "16", "-b", "8", "--output-dir", str(tmp_path / "out")]
    assert "does not exist" in user_error(capsys, small + ["--pretrained", str(tmp_path / "nope.pth.tar")])
    bad = tmp_path / "bad.pth.tar"
    bad.write_bytes(b"not a checkpoint")
    assert "cannot read checkpoint" in user_error(capsys, small + ["--pretrained", str(bad)])
    assert "--query image" in user_error(capsys, small + ["--pretrained", "none", "--query", str(tmp_path / "x.jpg")])
    (tmp_path / "notes.txt").write_text("hello")
    assert "cannot be read as an image" in user_error(capsys, small + ["--pretrained", "none", "--query",
                                                                       str(tmp_path / "notes.txt")])
    assert "nothing to do" in user_error(capsys, small + ["--pretrained", "none", "--skip-knn"])
    assert "--knn-k" in user_error(capsys, small + ["--pretrained", "none", "--knn-k", "0"])
    assert "--whiten must be" in user_error(capsys, small + ["--pretrained", "none", "--whiten", "-1"])
    assert "--label-fraction must be in (0, 1]" in user_error(capsys, small + ["--pretrained", "none",
                                                                                "--label-fraction", "0"])
    assert "drop them with --skip-knn" in user_error(capsys, small + ["--pretrained", "none", "--skip-knn",
                                                                      "--export-embeddings", "--label-fraction",
                                                                      "0.5"])
    assert "--batch-size 7 is not divisible" in user_error(
        capsys, small + ["--pretrained", "none", "-b", "7", "--cpu", "--multiprocessing-distributed",
                         "--nproc-per-node", "2"])
    # unlabelled images: no kNN accuracy, and the message names the way out
    photos = flat_folder(tmp_path / "photos")
    err = user_error(capsys, [photos, "-a", "resnet18", "-j", "0", "-b", "4", "--crop-size", "32", "--pretrained",
                              "none", "--output-dir", str(tmp_path / "out")])
    assert "have no label" in err and "--skip-knn" in err
    # labelled train but no val split
    os.makedirs(tmp_path / "labelled" / "a")
    flat_folder(tmp_path / "labelled" / "a", 3)
    err = user_error(capsys, [str(tmp_path / "labelled"), "-a", "resnet18", "-j", "0", "-b", "4", "--crop-size",
                              "32", "--pretrained", "none", "--output-dir", str(tmp_path / "out")])
    assert "needs a labelled val split" in err


def test_arch_mismatch_is_a_clear_error(capsys, moco_pretrained, tmp_path):
    err = user_error(capsys, SYNTHETIC + ["-a", "resnet50", "--pretrained", moco_pretrained, "--output-dir",
                                          str(tmp_path)])
    assert "resnet18" in err and "-a" in err
    err = user_error(capsys, SYNTHETIC + ["--small-images", "--synthetic-size", "16", "-b", "8", "--pretrained",
                                          moco_pretrained, "--output-dir", str(tmp_path)])
    assert "does not fit this backbone" in err


@pytest.mark.slow
def test_unlabelled_images_export_and_retrieve_with_skip_knn(tmp_path):
    photos = flat_folder(tmp_path / "photos", 6)
    out = tmp_path / "out"
    main_knn.main([photos, "-a", "resnet18", "-j", "0", "-b", "4", "--crop-size", "32", "--pretrained", "none",
                   "--skip-knn", "--export-embeddings", "--retrieval", "2", "--retrieval-k", "3", "--amp",
                   "--output-dir", str(out)])
    rows = read_csv(out / "embeddings" / "train.csv")
    assert np.load(out / "embeddings" / "train_features.npy").shape == (6, 512)
    assert [r["label"] for r in rows] == ["-1"] * 6 and rows[0]["path"].endswith("0.png")
    assert not os.path.exists(out / "knn_results.json")
    assert Image.open(out / "retrieval" / "grid_000.png").size == (4 * 34 + 2, 2 * 34 + 2)


@pytest.mark.slow
def test_a_partly_labelled_csv_votes_with_its_labelled_rows_and_whitens_on_all(tmp_path, capsys):
    """A csv with empty labels (the unlabelled pool beside a few labels): the labelled rows
    vote, every row is embedded, exported and in the whitening (5 axes from 8 images, where
    the 4 labelled ones could give at most 3)."""
    root = write_image_folder(tmp_path / "data", classes=("a", "b"), per_class=4, size=20, split_dirs=("train", "val"))
    with open(os.path.join(root, "train.csv"), "w") as f:
        f.write("path,label\n" + "".join(f"train/{c}/{i}.png,{c if i < 2 else ''}\n" for c in "ab" for i in range(4)))
    with open(os.path.join(root, "val.csv"), "w") as f:
        f.write("".join(f"val/{c}/{i}.png,{c}\n" for c in "ab" for i in range(4)))
    out = tmp_path / "out"
    base = [root, "--dataset", "csv", "-a", "resnet18", "-j", "0", "-b", "4", "--crop-size", "32", "--pretrained",
            "none", "--knn-k", "3"]
    main_knn.main(base + ["--whiten", "5", "--export-embeddings", "--output-dir", str(out)])
    assert "kNN votes with 4 of the 8 train images (the labelled ones; 4 have no label)" in capsys.readouterr().out
    info = results(out)
    assert (info["num_voters"], info["num_train"], info["whiten"]) == (4, 8, 5)
    assert np.load(out / "embeddings" / "train_labels.npy").tolist() == [0, 0, -1, -1, 1, 1, -1, -1]
    err = user_error(capsys, base + ["--label-fraction", "0.5", "--output-dir", str(tmp_path / "x")])
    assert "4 train images have no label" in err and "drop the flag" in err


@pytest.mark.slow
def test_embedding_tables_have_one_row_per_image_in_file_order_with_unreadable_ones_skipped(tmp_path):
    root = write_image_folder(tmp_path / "data", classes=("a", "b"), per_class=3, size=20, split_dirs=("train",))
    broken = [os.path.join(root, "train", "a", "1.png"), os.path.join(root, "train", "b", "0.png")]
    for path in broken:
        open(path, "wb").write(b"not an image")
    files = [os.path.join(root, "train", c, f"{i}.png") for c in ("a", "b") for i in range(3)]
    base = [root, "-a", "resnet18", "-j", "0", "-b", "4", "--crop-size", "32", "--pretrained", "none", "--skip-knn",
            "--export-embeddings", "--export-dtype", "float32"]
    formats = ["npy", "csv"] + (["parquet"] if available("pyarrow") else [])
    for fmt in formats:
        main_knn.main(base + ["--export-format", fmt, "--output-dir", str(tmp_path / fmt)])
    emb = tmp_path / "npy" / "embeddings"
    feats = np.load(emb / "train_features.npy")  # the readable images' rows, in order
    readable = [i for i, f in enumerate(files) if f not in broken]
    assert [r["path"] for r in read_csv(emb / "train.csv")] == [files[i] for i in readable]
    assert [r["path"] for r in read_csv(emb / "train_unreadable.csv")] == broken
    labels = [0, 0, 0, 1, 1, 1]

    rows = read_csv(tmp_path / "csv" / "embeddings" / "train_embeddings.csv")
    assert [r["path"] for r in rows] == files and [int(r["index"]) for r in rows] == list(range(6))
    assert [int(r["label"]) for r in rows] == labels and [r["class"] for r in rows] == ["a"] * 3 + ["b"] * 3
    assert [r["skipped"] for r in rows] == ["1" if f in broken else "0" for f in files]
    table = np.array([[float(r[f"f{d}"]) if r["skipped"] == "0" else np.nan for d in range(512)] for r in rows],
                     dtype=np.float32)
    assert np.array_equal(table[readable], feats) and np.isnan(table[[1, 3]]).all()  # 9 digits: exact
    assert [r["path"] for r in read_csv(tmp_path / "csv" / "embeddings" / "train_unreadable.csv")] == broken

    if "parquet" in formats:
        import pyarrow.parquet as pq
        t = pq.read_table(tmp_path / "parquet" / "embeddings" / "train_embeddings.parquet").to_pydict()
        assert t["path"] == files and t["index"] == list(range(6)) and t["label"] == labels
        assert t["skipped"] == [f in broken for f in files]
        assert [t["embedding"][i] for i in (1, 3)] == [None, None]
        assert np.array_equal(np.array([t["embedding"][i] for i in readable], dtype=np.float32), feats)
    # no temporary file left beside any export
    assert not [p for fmt in formats for p in os.listdir(tmp_path / fmt / "embeddings") if ".tmp" in p]


def test_export_format_errors_are_one_sentence(capsys, tmp_path, monkeypatch):
    small = SYNTHETIC + ["--synthetic-size", "16", "-b", "8", "--pretrained", "none", "--output-dir", str(tmp_path)]
    err = user_error(capsys, small + ["--export-format", "csv"])
    assert "--export-format csv is the format of --export-embeddings; add --export-embeddings" in err
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    err = user_error(capsys, small + ["--export-embeddings", "--export-format", "parquet"])
    assert "--export-format parquet needs the pyarrow package" in err and "pip install pyarrow" in err
    assert not os.path.exists(tmp_path / "embeddings")
