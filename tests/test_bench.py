"""bench/: smoke runs of the three benchmarks at tiny sizes (the JSON they write has the
fields the README tables come from, and ratios are against the baseline of the same run),
and the MNIST-format dataset path on IDX files written here (no shared data needed)."""
import argparse
import json
import os

import numpy as np
import pytest
import torch

from bench import dataloader as bench_dataloader
from bench import quality as bench_quality
from bench import recipes as bench_recipes
from bench import throughput as bench_throughput
from bench.util import format_table, mnist_subset, stratified_first, write_mnist_layout
from common.augment import transforms as augment
from common.data.datasets import build_dataset
from common.data.transformed import TransformedDataset
from common.errors import UserError
from common.eval.logreg import logistic_regression_accuracy
from moco.augment import moco_v2


def write_tiny_mnist(root, folder="FashionMNIST", n_train=60, n_test=30, seed=0):
    """Class c = a bright horizontal band at row 2c (learnable, 28x28 uint8)."""
    rng = np.random.default_rng(seed)

    def make(n):
        labels = np.arange(n) % 10
        x = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            x[i, 2 * c + 3:2 * c + 6, 4:24] = 230
        return x, labels.astype(np.uint8)

    (tr_x, tr_y), (te_x, te_y) = make(n_train), make(n_test)
    return write_mnist_layout(str(root), tr_x, tr_y, te_x, te_y, folder), (tr_x, tr_y)


@pytest.mark.parametrize("name,folder", [("fashion-mnist", "FashionMNIST"), ("mnist", "MNIST")])
def test_mnist_format_gives_3_channel_32px_tensors(tmp_path, name, folder):
    root, (tr_x, tr_y) = write_tiny_mnist(tmp_path, folder, n_train=20, n_test=10)
    args = argparse.Namespace(in_channels=None, dataset=name, data=root, download=False)
    train, val = build_dataset(args, "train"), build_dataset(args, "val")
    assert (len(train), len(val)) == (20, 10) and len(train.classes) == 10
    assert train.targets == [int(t) for t in tr_y]
    img, label = train[3]
    assert img.mode == "RGB" and img.size == (28, 28) and label == int(tr_y[3])
    rgb = np.asarray(img)
    assert (rgb[..., 0] == tr_x[3]).all() and (rgb[..., 1] == rgb[..., 0]).all() and (rgb[..., 2] == rgb[..., 0]).all()
    x, _ = TransformedDataset(train, augment.eval_transform(32))[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    views, _ = TransformedDataset(train, augment.TwoCropsTransform(moco_v2(32, blur=False)))[(3, 7)]
    assert [v.shape for v in views] == [(3, 32, 32)] * 2


def test_mnist_subset_is_class_balanced(tmp_path):
    src, _ = write_tiny_mnist(tmp_path / "src", n_train=60, n_test=30)
    dst = mnist_subset(src, str(tmp_path / "dst"), train_n=20, test_n=0)
    train = build_dataset(argparse.Namespace(in_channels=None, dataset="fashion-mnist", data=dst, download=False), "train")
    assert np.bincount(train.targets).tolist() == [2] * 10
    assert len(build_dataset(argparse.Namespace(in_channels=None, dataset="fashion-mnist", data=dst, download=False), "val")) == 30
    assert stratified_first(np.array([0, 0, 1, 1, 1]), 0).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_throughput_smoke(tmp_path):
    out = tmp_path / "t.json"
    bench_throughput.main(["-a", "resnet18", "--no-small-images", "--crop-size", "32", "-b", "8", "--moco-k", "16",
                           "--steps", "1", "--warmup", "1", "--repeats", "2", "--device", "cpu",
                           "--configs", "default", "channels_last", "foreach_optim", "gpu_augment", "gpu_decode",
                           "--jpeg-size", "48", "40", "--json", str(out)])
    rec = json.loads(out.read_text())
    assert rec["machine"]["device"] == "cpu" and "table" in rec
    for method in ("moco", "simclr"):
        res = rec["results"][method]
        assert list(res) == ["baseline", "default", "channels_last", "foreach_optim", "gpu_augment",
                             "gpu_decode"]  # + baseline
        base = res["baseline"]
        assert base["speedup_vs_baseline"] == pytest.approx(1.0)
        for name, r in res.items():
            if r.get("skipped"):  # SimCLR's LARS has one implementation
                assert method == "simclr" and name == "foreach_optim"
                continue
            assert r["images_per_s"] > 0 and r["step_ms"] > 0 and r["peak_memory_mb"] > 0
            assert len(r["step_ms_all_repeats"]) == 2
            assert r["images_per_s"] == pytest.approx(8 / (r["step_ms"] / 1000))
            assert r["speedup_vs_baseline"] == pytest.approx(r["images_per_s"] / base["images_per_s"])
        assert res["channels_last"]["config"]["channels_last"] and res["baseline"]["config"]["loop"] == "reference"
    assert rec["results"]["moco"]["foreach_optim"]["config"]["optim_impl"] == "foreach"
    assert rec["results"]["moco"]["gpu_augment"]["config"]["gpu_augment"]
    assert rec["results"]["moco"]["gpu_decode"]["config"]["gpu_decode"]  # the step decoded the JPEG bytes


def test_throughput_bad_input_is_one_sentence(capsys):
    with pytest.raises(SystemExit) as e:
        bench_throughput.main(["-b", "8", "--moco-k", "20", "--device", "cpu"])
    assert e.value.code == 2
    assert "--moco-k 20 is not a multiple of --batch-size 8" in capsys.readouterr().err


@pytest.mark.slow
def test_dataloader_smoke(tmp_path):
    out = tmp_path / "d.json"
    paths = ("reference", "pil", "gpu_split", "torchvision_blur", "tensor_v2")
    bench_dataloader.main(["--source", "jpeg", "--image-size", "120", "90", "--crop-size", "80", "--num-images", "16",
                           "-b", "8", "--workers", "0", "1", "--repeats", "1", "--recipes", "mocov2",
                           "--paths", *paths, "--json", str(out)])
    rec = json.loads(out.read_text())
    settings = {(r["setting"], r["workers"]): r for r in rec["results"]}
    assert set(settings) == {(s, w) for s in ("decode_only",) + tuple(f"mocov2/{p}" for p in paths) for w in (0, 1)}
    for (s, w), r in settings.items():
        assert r["images_per_s"] > 0
        if s != "decode_only":
            ref = settings[("mocov2/reference", w)]["images_per_s"]
            assert r["ratio_vs_reference"] == pytest.approx(r["images_per_s"] / ref)


def test_compared_pipelines_give_the_scripts_output_format():
    from PIL import Image
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 120, 3), dtype=np.uint8))
    for recipe in ("mocov2", "simclr"):
        outs = [bench_dataloader.PATHS[p][0](recipe, 80)(img) for p in ("reference", "pil", "torchvision_blur",
                                                                          "tensor_v2")]
        assert all(o.shape == (3, 80, 80) and o.dtype == torch.float32 for o in outs)
        crop, params = bench_dataloader.PATHS["gpu_split"][0](recipe, 80)(img)
        assert crop.dtype == torch.uint8 and crop.shape == (3, 80, 80) and params.dtype == torch.float32


@pytest.mark.long
@pytest.mark.slow
def test_quality_smoke(tmp_path):
    """The whole protocol on 60 train / 30 test images: every script runs, every cell is
    filled and the checks are computed (accuracies this small mean nothing)."""
    root, _ = write_tiny_mnist(tmp_path / "data", n_train=60, n_test=30)
    out = tmp_path / "q"
    rec = bench_quality.main([root, "--quick", "--pretrain-images", "40", "--train-images", "0", "--test-images", "0",
                              "--pretrain-epochs", "1", "--batch-size", "16", "--probe-epochs", "1", "--sup-epochs", "1",
                              "--moco-k", "32", "--fractions", "1", "0.5", "--lincls-probe", "--device", "cpu",
                              "--output-dir", str(out)])
    saved = json.loads((out / "quality.json").read_text())
    assert saved["results"] == rec["results"]
    assert (saved["pretrain_images"], saved["train_images"], saved["test_images"]) == (40, 60, 30)
    assert saved["labelled_images"] == {"1.0": 60, "0.5": 30}
    assert set(saved["results"]) == {"moco", "simclr", "random_init", "supervised", "statistics"}
    for name, row in saved["results"].items():
        for kind in ("linear", "knn", "knn_white") + (("lincls",) if name != "statistics" else ()):
            assert set(row[kind]) == {"1.0", "0.5"} and all(0 <= v <= 100 for v in row[kind].values())
    assert "moco_linear_beats_statistics_0.5" in saved["targets_met"]
    checks = saved["targets_met"]
    assert checks["moco_knn_beats_random_0.5"] == (saved["results"]["moco"]["knn"]["0.5"]
                                                   > saved["results"]["random_init"]["knn"]["0.5"])
    assert os.path.isfile(out / "moco" / "checkpoint_last.pth.tar")
    assert os.path.isfile(out / "probe_random_init_0.5" / "results.json")
    assert os.path.isfile(out / "supervised_0.5" / "label_subset.json")
    assert "--crop-min" in saved["recipes"]["simclr"]
    # --reuse: the finished training runs are kept and only probed again, with the same results
    logs = {p: os.path.getmtime(p) for p in (out / "moco" / "log.txt", out / "supervised_1" / "log.txt")}
    again = bench_quality.main([root, "--quick", "--pretrain-images", "40", "--train-images", "0", "--test-images", "0",
                                "--pretrain-epochs", "1", "--batch-size", "16", "--sup-epochs", "1", "--moco-k", "32",
                                "--fractions", "1", "0.5", "--device", "cpu", "--output-dir", str(out), "--reuse",
                                "--json", str(tmp_path / "again.json")])
    assert all(os.path.getmtime(p) == t for p, t in logs.items())
    for name, row in again["results"].items():
        assert all(row[k] == rec["results"][name][k] for k in ("linear", "knn", "knn_white")), name


def test_the_statistics_baseline_is_four_numbers_per_image_at_its_own_size(tmp_path):
    """bench/quality.py's hand-made baseline: grayscale mean, std, mean |d/dx|, mean |d/dy|."""
    from PIL import Image

    from common.data.images import image_folder
    os.makedirs(tmp_path / "a")
    Image.fromarray(np.array([[0, 255, 0], [0, 255, 0]], dtype=np.uint8)).save(tmp_path / "a" / "stripes.png")
    x, y = bench_quality.image_statistics(image_folder(str(tmp_path)))
    expected = [1 / 3, float(torch.tensor([0.0, 1, 0, 0, 1, 0]).std()), 1.0, 0.0]
    assert y.tolist() == [0] and torch.allclose(x, torch.tensor([expected]))
    assert bench_quality.script_dataset(argparse.Namespace(dataset="folder")) == "imagefolder"


def test_quality_budget_gives_each_method_its_epochs(capsys):
    """--pretrain-budget N: the same images seen for every method and pool; 'recipe': each
    method's `--recipe small` budget (MoCo 200k, SimCLR 100k); 0: --pretrain-epochs."""
    def args_for(budget):
        return bench_quality.finalize(bench_quality.get_args_parser().parse_args(
            ["DATA", "--quick", "--device", "cpu", "--pretrain-budget", budget]))

    recipe = args_for("recipe")
    assert [bench_quality.pretrain_epochs(recipe, m, 2000) for m in ("moco", "simclr", "inpaint")] == [100, 50, 50]
    assert bench_quality.pretrain_epochs(recipe, "moco", 10000) == 20
    fixed = args_for("30000")
    assert [bench_quality.pretrain_epochs(fixed, m, 2000) for m in ("moco", "simclr")] == [15, 15]
    assert bench_quality.pretrain_epochs(args_for("0"), "moco", 2000) == 8  # the --quick preset's epochs
    with pytest.raises(SystemExit):
        args_for("lots")
    assert "neither a number of images nor 'recipe'" in capsys.readouterr().err


def test_linear_probe_fits_separable_features_and_ignores_their_scale():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    y = torch.arange(200) % 4
    x = centres[y] + torch.randn(200, 16, generator=g)
    acc = logistic_regression_accuracy(x[:100], y[:100], x[100:], y[100:], 4)
    assert acc > 95
    # standardisation: the same features x 1e4 (a random-init ResNet's scale) give the same answer
    assert logistic_regression_accuracy(x[:100] * 1e4, y[:100], x[100:] * 1e4, y[100:], 4) == pytest.approx(acc)
    # chance on noise labels
    noise = torch.randint(0, 4, (200,), generator=g)
    assert logistic_regression_accuracy(x[:100], noise[:100], x[100:], noise[100:], 4) < 50


def test_quality_missing_data_is_one_sentence(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench_quality.main([str(tmp_path / "nowhere"), "--quick", "--device", "cpu", "--output-dir", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert ": error: fashion-mnist was not found under" in err and "Traceback" not in err


def test_format_table():
    t = format_table(["a", "bb"], [["x", "1.0"], ["yy", "10.5"]])
    assert t.splitlines()[0] == "| a  |   bb |" and t.splitlines()[3] == "| yy | 10.5 |"


@pytest.mark.long
@pytest.mark.slow
def test_endtoend_smoke_runs_the_script_on_jpegs_next_to_the_step_rate(tmp_path):
    from bench import endtoend
    out = tmp_path / "e.json"
    endtoend.main(["--method", "moco", "-a", "resnet18", "--crop-size", "32", "-b", "8", "-j", "1", "--moco-k", "16",
                   "--bn-splits", "2", "--num-images", "32", "--image-size", "48", "40", "--epochs", "2",
                   "--print-freq", "1", "--warmup-iters", "1", "--step-repeats", "1", "--step-steps", "2",
                   "--device", "cpu", "--configs", "gpu_augment", "--data-dir", str(tmp_path / "jpegs"),
                   "--json", str(out)])
    rec = json.loads(out.read_text())
    assert len(os.listdir(tmp_path / "jpegs")) == 10  # an ImageFolder of generated JPEGs, 10 classes
    # one configuration runs (each is a script run); the flags of the others are checked below
    r = rec["results"]["gpu_augment"]
    assert r["steady_images_per_s"] > 0 and r["epoch_images_per_s"] > 0 and 0 <= r["data_wait"] < 1
    assert r["ratio"] == pytest.approx(r["steady_images_per_s"] / r["step_images_per_s"])
    assert "--gpu-augment" in r["command"] and "main_moco.py" in r["command"]
    assert endtoend.script_flags("default") == ["--no-gpu-augment"]
    assert endtoend.script_flags("amp+channels_last+gpu_augment") == ["--amp", "--channels-last", "--gpu-augment"]
    assert endtoend.script_flags("amp+channels_last+gpu_decode+compile") == [
        "--amp", "--channels-last", "--compile", "--gpu-augment", "--gpu-decode"]


def test_quality_fits_the_queue_to_the_pool_and_reports_mean_and_spread():
    assert bench_quality.fitted_queue(10000, 64) == 960  # a tenth of the pool, a multiple of the batch
    assert bench_quality.fitted_queue(2000, 64) == 192
    assert bench_quality.fitted_queue(60000, 256) == 4096  # capped
    assert bench_quality.fitted_queue(100, 64) == 64  # at least one batch
    assert bench_quality.mean_and_spread([70.0, 72.0, 74.0]) == pytest.approx((72.0, 2.0))
    assert bench_quality.mean_and_spread([70.0]) == (70.0, 0.0)


@pytest.mark.slow
def test_recipes_table_times_the_script_and_derives_the_minutes(tmp_path):
    """One timed epoch of main_moco.py --recipe small on 64 JPEGs of 37 px; the table's
    minutes are the budget's epochs over that rate, and it shows what the recipe sets."""
    rec = bench_recipes.main(["--methods", "moco", "--crop-sizes", "32", "--pools", "1000", "20000",
                              "--budget", "120000", "--measure-images", "64", "--measure-epochs", "1", "--device", "cpu",
                              "--output-dir", str(tmp_path)])
    assert json.loads((tmp_path / "recipes.json").read_text())["results"] == rec["results"]
    small, large = rec["results"]
    assert (small["pool"], small["epochs"], large["epochs"]) == (1000, 120, 6)
    assert small["minutes"] == pytest.approx(120 * 1000 / small["images_per_sec"] / 60)
    assert "--moco-k 64 " in small["recipe_sets"] + " " and "--moco-k 1984" in large["recipe_sets"]
    assert small["command"].startswith("main_moco.py DATA --recipe small --epochs 120 ")
    assert "--crop-min 0.3" in small["recipe_sets"] and small["command"].endswith("--no-small-images")
    assert (tmp_path / "moco_32px" / "metrics.jsonl").is_file()
    # another budget from the same timings: half the images, half the minutes, nothing run
    again = bench_recipes.main(["--methods", "moco", "--crop-sizes", "32", "--pools", "1000", "--budget", "60000",
                                "--rates", str(tmp_path / "recipes.json"), "--device", "cpu",
                                "--output-dir", str(tmp_path / "again")])["results"][0]
    assert (again["epochs"], again["images_per_sec"]) == (60, small["images_per_sec"])
    assert again["minutes"] == pytest.approx(small["minutes"] / 2)
    assert not (tmp_path / "again" / "moco_32px").exists()
    # no --budget: the recipe's own epochs (MoCo: 200,000 images seen), set by the recipe, not the command
    own = bench_recipes.main(["--methods", "moco", "--crop-sizes", "32", "--pools", "1000", "--rates",
                              str(tmp_path / "recipes.json"), "--device", "cpu",
                              "--output-dir", str(tmp_path / "own")])["results"][0]
    assert own["epochs"] == 200 and own["recipe_sets"].startswith("--epochs 200 ") and "--epochs" not in own["command"]


def test_recipes_source_size_is_parsed_or_one_sentence():
    args = bench_recipes.get_args_parser().parse_args(["--source-size", "500x375"])
    assert bench_recipes.source_size(args, 32) == (500, 375)
    assert bench_recipes.source_size(bench_recipes.get_args_parser().parse_args([]), 224) == (256, 256)
    with pytest.raises(UserError, match="is not WIDTHxHEIGHT"):
        bench_recipes.source_size(bench_recipes.get_args_parser().parse_args(["--source-size", "500"]), 32)
    with pytest.raises(UserError, match="writes square images"):
        bench_recipes.source_size(bench_recipes.get_args_parser().parse_args(
            ["--source-size", "256x200", "--source-format", "png"]), 32)


@pytest.mark.slow
def test_quality_on_the_inspection_set_runs_the_readme_recipe(tmp_path):
    """--dataset inspection: the set is written once (seeded), pretraining is `--recipe small`
    with nothing chosen for it, and each backbone is probed at the crop its run used."""
    out = tmp_path / "q"
    argv = [str(tmp_path / "data"), "--dataset", "inspection", "--quick", "--inspection-images", "40",
            "--inspection-size", "56", "--methods", "simclr", "--pretrain-epochs", "1", "--fractions", "1",
            "--no-supervised", "--device", "cpu", "--output-dir", str(out), "--pretrain-flags", "-b 8"]
    rec = bench_quality.main(argv)
    run = rec["by_pool"]["30"]
    assert run["recipes"]["simclr"][-3:] == ["small", "-b", "8"] and "--crop-min" not in run["recipes"]["simclr"]
    assert run["per_seed"]["0"]["crops"] == {"simclr": 64, "random_init": 64}  # a 56 px source: 64 px crops
    assert set(rec["results"]) == {"simclr", "random_init", "statistics"}
    log = (out / "simclr" / "log.txt").read_text()
    assert "grayscale, median shortest side 56 px" in log and "--gray-images" in log
    written = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert written == ["inspection_40_56px_seed0"]


def test_payoff_folds_scores_a_checkpoint_with_shuffled_and_grouped_folds(tmp_path, capsys):
    from PIL import Image

    from bench import payoff_folds
    from common.nets.models import build_backbone
    rng = np.random.default_rng(0)
    for c in ("a", "b"):  # six groups of two images per class
        os.makedirs(tmp_path / "data" / "train" / c)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                tmp_path / "data" / "train" / c / f"s{i // 2}_{c}{i}.png")
    net = build_backbone("resnet18", small_images=True, crop_size=16)
    torch.save({"arch": "resnet18", "method": "simclr", "args": {"small_images": True, "crop_size": 16},
                "state_dict": {f"module.encoder.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "c.pth.tar")
    payoff_folds.main([str(tmp_path / "data"), "--groups", r"^(s\d+)_", "--checkpoint", str(tmp_path / "c.pth.tar"),
                       "--output", str(tmp_path / "out.json")])
    said = capsys.readouterr().out
    assert "shuffled folds: untrained" in said and "grouped folds: untrained" in said
    doc = json.load(open(tmp_path / "out.json"))[str(tmp_path / "c.pth.tar")]
    assert set(doc) == {"shuffled", "grouped"} and len(doc["grouped"]["checkpoint"]) == 5


@pytest.mark.slow
def test_quality_distils_a_teacher_and_probes_it_at_its_own_architecture(tmp_path):
    """--methods distill --teacher: main_distill.py runs with that teacher, and the 'teacher' row
    is probed at the teacher's architecture (resnet18) while the student is another family; every
    backbone's feature extraction speed is recorded."""
    from common.nets.models import build_backbone
    root, _ = write_tiny_mnist(tmp_path / "data", n_train=60, n_test=30)
    torch.manual_seed(0)
    net = build_backbone("resnet18", small_images=False, crop_size=32)
    teacher = str(tmp_path / "teacher.pth.tar")
    torch.save({"arch": "resnet18", "method": "simclr", "args": {"small_images": False, "crop_size": 32},
                "state_dict": {f"module.encoder.{k}": v for k, v in net.state_dict().items()}}, teacher)
    out = tmp_path / "q"
    rec = bench_quality.main([root, "--quick", "--pretrain-images", "40", "--train-images", "0", "--test-images", "0",
                              "--pretrain-epochs", "1", "--batch-size", "16", "--fractions", "1", "--no-supervised",
                              "--methods", "distill", "--teacher", teacher, "-a", "mobilenet_v3_small",
                              "--device", "cpu", "--output-dir", str(out)])
    assert set(rec["results"]) == {"distill", "random_init", "teacher", "statistics"}
    assert rec["recipes"]["distill"][-2:] == ["--teacher", teacher]
    log = (out / "distill" / "log.txt").read_text()
    assert "mobilenet_v3_small" in log and "teacher" in log
    per_seed = rec["by_pool"]["40"]["per_seed"]["0"]
    assert set(per_seed["inference_images_per_sec"]) == {"distill", "random_init", "teacher"}
    assert all(v > 0 for v in per_seed["inference_images_per_sec"].values())
    assert "feature extraction, images/s: distill" in rec["table"]
    with pytest.raises(SystemExit):  # distill without a teacher: one sentence, before anything runs
        bench_quality.main([root, "--quick", "--methods", "distill", "--device", "cpu", "--output-dir", str(out)])
