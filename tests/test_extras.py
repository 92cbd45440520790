"""A newcomer's path and the optional extras: README's install and test commands are what
CI runs; --tensorboard writes the expected tags; plot_run.py and --plot-embeddings draw
PNGs; a missing optional package is one sentence."""
import os
import re
import sys

import pytest
from conftest import ROOT, SYNTHETIC, run_script
from PIL import Image

import main_knn
import main_moco
import plot_run
from common.extras import available
from common.log.plots import CURVES_SIZE

TINY = SYNTHETIC + ["--synthetic-size", "64", "-b", "16", "--moco-k", "32", "--moco-dim", "16",
                    "--mlp", "--aug-plus", "--bn-splits", "2", "--seed", "3", "-p", "2", "--no-payoff"]
needs_tensorboard = pytest.mark.skipif(not available("tensorboard"), reason="tensorboard is an optional extra")
needs_matplotlib = pytest.mark.skipif(not available("matplotlib"), reason="matplotlib is an optional extra")


def readme_block(section: str) -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    body = text.split(f"## {section}\n", 1)[1]
    return re.search(r"```bash\n(.*?)```", body, re.S).group(1).strip()


def test_ci_runs_exactly_readmes_install_and_test_commands():
    ci = [line for line in open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
          if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == readme_block("Install").splitlines() + readme_block("Test").splitlines()
    # the install brings the test runner, and every requirements file it names exists
    install = readme_block("Install")
    assert "pytest" in install.split()
    for name in re.findall(r"-[rc] (\S+)", install):
        assert os.path.isfile(os.path.join(ROOT, name)), name


def test_the_install_pins_a_tested_combination():
    """A fresh clone installs the versions CI passed on (-c constraints.txt): a new torch
    release must not change what a newcomer's first test run does."""
    install = readme_block("Install")
    assert "-c constraints.txt" in install
    pins = dict(line.split("==") for line in open(os.path.join(ROOT, "constraints.txt")).read().splitlines()
                if line and not line.startswith("#"))
    pins = {k.lower().replace("_", "-"): v for k, v in pins.items()}
    for req in ("requirements.txt", "requirements-extra.txt"):
        for line in open(os.path.join(ROOT, req)).read().splitlines():
            name = re.split(r"[<>=\s#]", line.strip(), 1)[0].lower()
            assert not name or name in pins, f"{name} ({req}) has no pinned version in constraints.txt"
    assert "pytest" in pins


def events(folder: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(folder, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc.Tags()


@pytest.mark.slow
@needs_tensorboard
@needs_matplotlib
def test_tensorboard_and_curves_from_a_real_one_epoch_run(tmp_path):
    run_script("main_moco.py", TINY + ["--epochs", "1", "--output-dir", str(tmp_path), "--tensorboard"])
    tags = events(str(tmp_path / "tensorboard"))["scalars"]
    assert {"step/loss", "step/acc1", "step/lr", "step/data_wait"} <= set(tags)  # every progress line
    assert {"epoch/loss", "epoch/lr", "epoch/images_per_sec"} <= set(tags)  # metrics.jsonl's numbers
    assert os.path.getsize(tmp_path / "metrics.jsonl") > 0  # still the record
    plot_run.main([str(tmp_path)])
    png = Image.open(tmp_path / "curves.png")
    assert png.size == (CURVES_SIZE[0] * 100, CURVES_SIZE[1] * 100) and png.getextrema() != ((255, 255),) * 4


@pytest.mark.slow
@needs_tensorboard
@needs_matplotlib
def test_knn_tensorboard_retrieval_images_and_embedding_map(moco_pretrained, tmp_path, capsys):
    main_knn.main(["--dataset", "synthetic", "--synthetic-size", "64", "-j", "0", "--pretrained", moco_pretrained,
                   "--output-dir", str(tmp_path), "--tensorboard", "--retrieval", "2", "--plot-embeddings"])
    tags = events(str(tmp_path / "tensorboard"))
    assert {"knn_k20/top1", "knn_k200/top5"} <= set(tags["scalars"]) and "retrieval/grid_000" in tags["images"]
    png = Image.open(tmp_path / "embeddings_pca.png")
    assert png.size == (800, 800) and len(png.convert("RGB").getcolors(1 << 20)) > 3  # points in several colours


@pytest.mark.parametrize("package,argv,main", [
    ("tensorboard", TINY + ["--tensorboard"], main_moco.main),
    ("matplotlib", ["--dataset", "synthetic", "--pretrained", "none", "--plot-embeddings"], main_knn.main),
])
def test_a_missing_optional_package_is_one_sentence(package, argv, main, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if it were not installed
    with pytest.raises(SystemExit) as e:
        main(argv + ["--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"needs the {package} package" in err and "Traceback" not in err


def test_plot_run_without_metrics_is_one_sentence(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        plot_run.main([str(tmp_path)])
    assert e.value.code == 2 and "has no metrics.jsonl" in capsys.readouterr().err
