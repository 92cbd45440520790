"""main_lincls.py: frozen linear probe, checkpoint layouts, pretrained > random init, resume, DDP,
and one-sentence errors (label subsets, balanced sampling and metrics: test_lincls_labels.py)."""
import contextlib
import csv
import io
import json
import os

import pytest
import torch
import torch.nn as nn
from conftest import LEARNING_KNN_IMAGES, SYNTHETIC, run_main, run_script, write_image_folder

import main_lincls
from common.ckpt.pretrained import torchvision_weights_path
from common.data.subsets import SubsetDataset
from common.nets.models import build_backbone
from lincls.heads import build_classifier

# The probe comparison config: 512 training / 128 val images, 8 iterations per epoch, with
# --head-bn (MAE's parameter-free BatchNorm before the linear layer). Without it the SGD probe
# sees raw features whose scale differs by orders of magnitude between a random-init and a
# pretrained backbone, and the comparison was noise: on the fixture's checkpoint lr 0.001 /
# 0.01 / 0.03 / 0.1 gave MoCo 42 / 27 / 30 / 34 vs random 12 / 27 / 36 / 38, and the same
# lr changed sides between environments (33.6 vs 26.6 two days earlier). With --head-bn, lr 0.1 / 0.3 / 1 / 3 give MoCo 88 / 78 /
# 84 / 79 vs random 70 / 69 / 69 / 70.
PROBE = SYNTHETIC + ["--synthetic-size", "512", "-b", "64", "--epochs", "3", "--lr", "0.1", "--cos", "--head-bn",
                     "--seed", "1", "-p", "100"]
TINY = SYNTHETIC + ["--synthetic-size", "64", "-b", "32", "--epochs", "1", "--lr", "0.1", "--seed", "2", "-p", "100"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def run_in_process(argv, capsys=None):
    """main() in this process: the same code path as the command line without the ~5 s
    of importing torch + torchvision again. Returns (exit code, stderr)."""
    code = run_main(main_lincls.main, argv)
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def lincls(argv) -> str:
    """A successful in-process run; returns what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code, _ = run_in_process(argv)
    assert code == 0, f"main_lincls.py {' '.join(argv)} failed ({code}):\n{out.getvalue()[-2000:]}\n{err.getvalue()[-2000:]}"
    return out.getvalue()


# ---------------------------------------------------------------- checkpoint layouts

def official_moco_checkpoint(path, arch="resnet18"):
    """A checkpoint laid out as facebookresearch/moco writes it (moco_v2_800ep_pretrain.pth.tar):
    `module.encoder_q.*` with the MLP head's fc keys, `module.encoder_k.*`, `module.queue`,
    `module.queue_ptr`; no "method" key."""
    torch.manual_seed(0)
    enc = build_backbone(arch, num_classes=128)
    enc.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
    for m in enc.modules():  # non-default BN statistics, so loading them is visible
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    sd = {}
    for k, v in enc.state_dict().items():
        sd["module.encoder_q." + k] = v
        sd["module.encoder_k." + k] = v.clone()
    sd["module.queue"] = torch.randn(128, 64)
    sd["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    torch.save({"epoch": 800, "arch": arch, "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}, path)
    return {k[len("module.encoder_q."):]: v for k, v in sd.items()
            if k.startswith("module.encoder_q.") and ".fc." not in "." + k[len("module.encoder_q."):]}


@pytest.mark.slow
def test_loads_official_reference_layout(tmp_path, capsys):
    expected = official_moco_checkpoint(tmp_path / "moco_v2_800ep_pretrain.pth.tar")
    out = tmp_path / "out"
    code, err = run_in_process(TINY + ["--pretrained", str(tmp_path / "moco_v2_800ep_pretrain.pth.tar"),
                                       "--output-dir", str(out)], capsys)
    assert code == 0, err
    sd = load(out / "checkpoint_last.pth.tar")["state_dict"]
    assert set(k for k in sd if not k.startswith("module.fc.")) == {"module." + k for k in expected}
    for k, v in expected.items():
        assert torch.equal(sd["module." + k], v), k  # weights and BN statistics, untouched by training
    assert sd["module.fc.weight"].shape == (8, 512)
    # the same file, no arch key and a backbone it does not fit: one sentence
    ck = load(tmp_path / "moco_v2_800ep_pretrain.pth.tar")
    del ck["arch"]
    torch.save(ck, tmp_path / "noarch.pth.tar")
    code, err = run_in_process(TINY[:3] + ["resnet34"] + TINY[4:] + ["--pretrained", str(tmp_path / "noarch.pth.tar"),
                                                                   "--output-dir", str(tmp_path / "x")], capsys)
    assert code == 2 and "does not fit this backbone" in err and "-a/--arch" in err


def test_imagenet_weights_only_from_the_local_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    args = main_lincls.finalize_args(main_lincls.get_args_parser().parse_args(
        SYNTHETIC + ["--pretrained", "imagenet", "--output-dir", str(tmp_path / "o")]))
    with pytest.raises(main_lincls.UserError, match="not cached .* nothing is downloaded"):
        build_classifier(args, 8)
    cached = build_backbone("resnet18", num_classes=1000).state_dict()  # stands in for torchvision's file
    path = torchvision_weights_path("resnet18")
    assert path.startswith(str(tmp_path / "torch"))
    os.makedirs(os.path.dirname(path))
    torch.save(cached, path)
    model, reference, source = build_classifier(args, 8)
    assert "torchvision" in source and model.fc.out_features == 8
    assert torch.equal(model.state_dict()["layer4.1.bn2.running_var"], cached["layer4.1.bn2.running_var"])


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def probes(moco_pretrained, moco_untrained, tmp_path_factory):
    """The same probe (seed, epochs, lr) on MoCo features and on the untrained control (the
    same run at lr 0: conftest.moco_untrained)."""
    root = tmp_path_factory.mktemp("lincls")
    out = {}
    for name, pre in (("moco", moco_pretrained), ("untrained", moco_untrained)):
        out[name] = (root / name, lincls(PROBE + ["--pretrained", pre, "--output-dir", str(root / name)]))
    return out


@pytest.mark.slow
def test_frozen_probe_keeps_backbone_and_trains_head(probes, moco_pretrained):
    folder, stdout = probes["moco"]
    assert "sanity check passed" in stdout and "frozen backbone" in stdout
    pre = load(moco_pretrained)["state_dict"]
    ckpt = load(folder / "checkpoint_last.pth.tar")
    assert ckpt["method"] == "lincls" and ckpt["epoch"] == 3 and "best_acc1" in ckpt
    sd = ckpt["state_dict"]
    backbone = [k for k in sd if not k.startswith("module.fc.")]
    assert len(backbone) == 120  # resnet18: weights + BN buffers
    for k in backbone:
        assert torch.equal(sd[k], pre["module.encoder_q." + k[len("module."):]]), k  # incl. BN running stats
    # the head moved away from its initialisation (same seed -> same initial head)
    args = main_lincls.finalize_args(main_lincls.get_args_parser().parse_args(
        PROBE + ["--pretrained", moco_pretrained, "--output-dir", str(folder), "--resume", "auto"]))
    torch.manual_seed(args.seed)
    init, _, _ = build_classifier(args, 8)
    assert not torch.allclose(sd["module.fc.1.weight"], init.fc[1].weight, atol=1e-3)
    assert sd["module.fc.1.bias"].abs().sum() > 0
    # --head-bn: the head's BatchNorm has no parameters, and learned the features' statistics
    assert isinstance(init.fc[0], torch.nn.BatchNorm1d) and not list(init.fc[0].parameters())
    assert sd["module.fc.0.running_var"].shape == (512,) and not torch.allclose(sd["module.fc.0.running_var"],
                                                                                 torch.ones(512))

    # every metric file of the last epoch
    results = json.load(open(folder / "results.json"))
    last = [json.loads(line) for line in open(folder / "metrics.jsonl")][-1]
    assert results["final"]["acc1"] == pytest.approx(last["acc1"])
    assert results["best_acc1"] == pytest.approx(max(json.loads(line)["acc1"] for line in open(folder / "metrics.jsonl")))
    rows = list(csv.reader(open(folder / "confusion_matrix.csv")))
    assert len(rows) == 9 and sum(int(x) for r in rows[1:] for x in r[1:]) == 128
    per_class = list(csv.DictReader(open(folder / "per_class.csv")))
    assert len(per_class) == 8 and sum(int(r["support"]) for r in per_class) == 128
    assert os.path.isfile(folder / "model_best.pth.tar") and not os.path.exists(folder / "checkpoint_0003.pth.tar")
    assert "=> final" in stdout and "macro_f1" in stdout


@pytest.mark.slow
def test_pretrained_probe_beats_the_untrained_network(probes):
    """Measured over fixture seeds 1-6 (2 CPU cores, torch 2.14.1; 128 val images, so one
    image is 0.8 points): top-1 68.0-77.3 against 57.8-64.1 untrained, gains 7.8-18.0 (mean
    11.7, sd 3.9); margin 3. The logreg test below, on 512 val images, carries the larger
    margin; against --pretrained none (70.3) this probe's gain was -2.3..+7."""
    acc = {name: json.load(open(folder / "results.json"))["final"]["acc1"] for name, (folder, _) in probes.items()}
    print(f"probe top-1 after {PROBE[PROBE.index('--epochs') + 1]} epochs: {acc}")
    assert acc["moco"] > acc["untrained"] + 3, acc


def test_evaluate_reproduces_best_accuracy(probes, tmp_path):
    folder, _ = probes["moco"]
    best = load(folder / "model_best.pth.tar")
    stdout = lincls(SYNTHETIC + ["--synthetic-size", "512", "-b", "64", "--evaluate",
                                 "--resume", str(folder / "model_best.pth.tar"), "--output-dir", str(tmp_path)])
    ev = json.load(open(tmp_path / "evaluation.json"))
    assert ev["acc1"] == pytest.approx(best["best_acc1"]) and "evaluation of" in stdout
    assert os.path.isfile(tmp_path / "confusion_matrix_eval.csv")


def resumed_equals_straight(base, straight, split):
    """`base` for 2 epochs in `straight`, and for 1 epoch then --resume auto to 2 in `split`:
    the same final weights and best top-1. Returns both final checkpoints."""
    lincls(base + ["--epochs", "2", "--output-dir", str(straight)])
    lincls(base + ["--epochs", "1", "--output-dir", str(split)])
    assert "resumed from" in lincls(base + ["--epochs", "2", "--output-dir", str(split), "--resume", "auto"])
    a, b = load(straight / "checkpoint_last.pth.tar"), load(split / "checkpoint_last.pth.tar")
    assert a["epoch"] == b["epoch"] == 2 and a["best_acc1"] == b["best_acc1"]
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    return a, b


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path, capsys):
    # fine-tuning with an MLP head (dropout), a label subset and balanced sampling: every RNG in play
    base = SYNTHETIC + ["--synthetic-size", "96", "-b", "16", "--lr", "0.05", "--schedule", "1", "--finetune",
                        "--head", "mlp", "--label-fraction", "0.5", "--balanced-sampling", "--class-weights",
                        "--pretrained", "none", "--seed", "7", "-p", "100"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    a, b = resumed_equals_straight(base, straight, split)
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert json.load(open(straight / "label_subset.json")) == json.load(open(split / "label_subset.json"))
    # continuing on other training images is refused
    code, err = run_in_process(base + ["--epochs", "3", "--output-dir", str(split), "--resume", "auto",
                                       "--label-fraction", "1.0"], capsys)
    assert code == 2 and "was trained with --label-fraction 0.5" in err
    # and so is another head
    code, err = run_in_process(base + ["--epochs", "3", "--output-dir", str(split), "--resume", "auto", "--head-bn"],
                               capsys)
    assert code == 2 and "was trained with --head-bn off but this run has --head-bn on" in err


def one_and_two_gloo_workers(args, tmp_path, port: int):
    """`args` in this process and as 2 gloo CPU workers; returns both final checkpoints."""
    one, two = tmp_path / "one", tmp_path / "two"
    lincls(args + ["--output-dir", str(one)])
    proc = run_script("main_lincls.py", args + ["--output-dir", str(two), "--cpu", "--multiprocessing-distributed",
                                                "--nproc-per-node", "2", "--dist-url", f"tcp://127.0.0.1:{port}"])
    assert "2 process(es)" in proc.stdout and "sanity check passed" in proc.stdout
    return load(one / "checkpoint_last.pth.tar"), load(two / "checkpoint_last.pth.tar")


@pytest.mark.slow
def test_two_gloo_workers_match_one_process(tmp_path):
    # frozen BN + the same global batch: 2 workers x 16 compute the 1 x 32 run's gradients
    args = TINY + ["--pretrained", "none", "--synthetic-size", "128", "--epochs", "1"]
    a, b = one_and_two_gloo_workers(args, tmp_path, 29533)
    for k in ("module.fc.weight", "module.fc.bias"):
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=1e-4, atol=1e-5)
    ra, rb = json.load(open(tmp_path / "one" / "results.json")), json.load(open(tmp_path / "two" / "results.json"))
    assert ra["final"]["confusion"] == rb["final"]["confusion"]  # every val image evaluated once


# ---------------------------------------------------------------- user errors

def test_errors_are_one_sentence(tmp_path, moco_pretrained, capsys):
    out = ["--output-dir", str(tmp_path / "o")]
    # wrong architecture for the checkpoint
    code, err = run_in_process(TINY[:3] + ["resnet34"] + TINY[4:] + ["--pretrained", moco_pretrained] + out, capsys)
    assert code == 2 and "holds a resnet18 but -a/--arch is resnet34" in err
    # not a pretraining checkpoint: a text file, a torch file without weights, an unknown layout
    (tmp_path / "notes.txt").write_text("hello")
    torch.save({"epoch": 3, "accuracy": 0.5}, tmp_path / "stats.pth.tar")
    torch.save({"state_dict": {"net.weight": torch.zeros(2)}}, tmp_path / "other.pth.tar")
    for name, message in (("notes.txt", "not a checkpoint"), ("stats.pth.tar", "is not a training checkpoint"),
                          ("other.pth.tar", "unknown checkpoint layout")):
        code, err = run_in_process(TINY + ["--pretrained", str(tmp_path / name)] + out, capsys)
        assert code == 2 and message in err, (name, err)
    # val classes differ from train classes
    root = write_image_folder(tmp_path / "data", classes=("cat", "dog"), per_class=2, split_dirs=("train",))
    write_image_folder(tmp_path / "data", classes=("cat", "cow"), per_class=2, split_dirs=("val",))
    code, err = run_in_process([root, "-a", "resnet18", "-j", "0", "-b", "2", "--pretrained", "none"] + out, capsys)
    assert code == 2 and "differ from train classes" in err
    # a label fraction that leaves a class empty (8 classes x 4 images, 10%)
    code, err = run_in_process(TINY + ["--synthetic-size", "32", "--pretrained", "none", "--label-fraction", "0.1"] + out,
                               capsys)
    assert code == 2 and "leaves class" in err and "with no labelled image" in err
    # a MoCo checkpoint is not a lincls checkpoint to resume; --evaluate needs one; --pretrained is required
    code, err = run_in_process(TINY + ["--pretrained", "none", "--resume", moco_pretrained] + out, capsys)
    assert code == 2 and "main_lincls.py can only resume its own checkpoints" in err
    code, err = run_in_process(TINY + ["--evaluate"] + out, capsys)
    assert code == 2 and "--evaluate needs a trained classifier" in err
    code, err = run_in_process(TINY + out, capsys)
    assert code == 2 and "--pretrained is required" in err
    for line in err.strip().splitlines():
        assert "Traceback" not in line


@pytest.mark.slow
def test_error_reaches_the_user_as_one_line(tmp_path):
    proc = run_script("main_lincls.py", TINY[:3] + ["resnet50"] + TINY[4:] + [
        "--pretrained", str(tmp_path / "missing.pth.tar"), "--output-dir", str(tmp_path)], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("main_lincls.py: error:") and "does not exist" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_logreg_probe_fits_the_head_in_one_go_and_beats_the_untrained_network(moco_pretrained, moco_untrained,
                                                                               tmp_path, capsys):
    """--probe logreg: the head is the logistic regression fitted on the frozen features of
    the un-augmented training images (lincls/logreg.py, checked against a direct fit on the
    same features); the backbone stays the checkpoint's; the classifier reloads with
    --evaluate; pretrained beats the untrained control on 10 % of the labels without any lr.

    On the learning tests' 2,048 images (205 labelled, 512 val), over fixture seeds 1-6 (2 CPU
    cores, torch 2.14.1): top-1 69.5-76.8 against 45.5-56.2 untrained, gains 15.9-28.4 (mean
    22.8, sd 4.4); margin 10. Against --pretrained none (66.0): +3.5..+10.8."""
    from common.augment import transforms as augment
    from common.data.datasets import build_dataset
    from common.data.transformed import TransformedDataset
    from common.eval.features import extract_features
    from common.nets.models import without_head
    from common.eval.logreg import fit_logistic_regression

    acc = {}
    data = SYNTHETIC + ["--synthetic-size", str(LEARNING_KNN_IMAGES), "-b", "256"]
    base = data + ["--probe", "logreg", "--label-fraction", "0.1", "--seed", "1"]
    for name, pre in (("moco", moco_pretrained), ("untrained", moco_untrained)):
        out = tmp_path / name
        stdout = lincls(base + ["--pretrained", pre, "--output-dir", str(out)])
        results = json.load(open(out / "results.json"))
        assert results["probe"] == "logreg" and 200 <= results["num_train_images"] <= 210  # a tenth of 2,048
        acc[name] = results["final"]["acc1"]
        assert "logistic-regression probe" in stdout and "sanity check passed" in stdout
    assert acc["moco"] > acc["untrained"] + 10, acc

    ckpt = load(tmp_path / "moco" / "model_best.pth.tar")
    sd = ckpt["state_dict"]
    pre = load(moco_pretrained)["state_dict"]
    for k in [k for k in sd if not k.startswith("module.fc.")]:
        assert torch.equal(sd[k], pre["module.encoder_q." + k[len("module."):]]), k
    # the head equals a direct fit on the same features
    args = main_lincls.finalize_args(main_lincls.get_args_parser().parse_args(
        base + ["--pretrained", moco_pretrained, "--output-dir", str(tmp_path / "x")]))
    net, _, _ = build_classifier(args, 8)
    subset = json.load(open(tmp_path / "moco" / "label_subset.json"))
    train = build_dataset(args, "train")
    indices = subset["indices"]
    plain = TransformedDataset(SubsetDataset(train, indices), augment.eval_transform(args.crop_size))
    with without_head(net):
        x, y = extract_features(net, plain, 64, torch.device("cpu"), normalize=False)
    w, b = fit_logistic_regression(x, y, 8)
    torch.testing.assert_close(sd["module.fc.weight"], w.T.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sd["module.fc.bias"], b.float(), rtol=1e-4, atol=1e-5)

    stdout = lincls(data + ["--evaluate", "--resume", str(tmp_path / "moco" / "model_best.pth.tar"),
                            "--output-dir", str(tmp_path / "ev")])
    assert json.load(open(tmp_path / "ev" / "evaluation.json"))["acc1"] == pytest.approx(acc["moco"])

    code, err = run_in_process(base + ["--pretrained", "none", "--finetune", "--output-dir", str(tmp_path / "bad")],
                               capsys)
    assert code == 2 and "--probe logreg fits one linear head" in err and "drop --finetune" in err


def test_arch_and_stem_follow_the_pretraining_checkpoint(moco_pretrained, tmp_path):
    """`--pretrained ckpt` alone rebuilds the network the run trained (as main_knn.py does):
    -a and --small-images come from the checkpoint's args unless given."""
    saved = load(moco_pretrained)["args"]

    def finalized(extra):
        argv = ["--dataset", "synthetic", "--pretrained", moco_pretrained, "--output-dir", str(tmp_path / "o")] + extra
        return main_lincls.finalize_args(main_lincls.get_args_parser().parse_args(argv))

    args = finalized([])
    assert (args.arch, args.small_images) == (saved["arch"], saved["small_images"]) == ("resnet18", False)
    assert finalized(["--small-images"]).small_images is True  # a given flag wins
    assert finalized(["--pretrained", "none"]).arch == "resnet50"  # nothing to follow: the reference default
