"""README.md row by row, as a new user on a small folder of their own runs it: every command of
"The scripts and their documents" runs on a generated folder of a few hundred images; plus
the defaults that make those rows work there (MoCo v3's recipe per optimizer, a default
batch larger than the dataset)."""
import argparse
import importlib
import os
import re
import shlex

import pytest
from conftest import ROOT, run_inline, write_image_folder

import main_moco_v3
from common.train.data import fit_default_batch

# What the test changes in a row, and why (a user's folder and time, not the rows' meaning):
# - every pretraining row trains 1 epoch (--epochs 1; -j 0: the test's one core) into its own
#   --output-dir; the rows' ImageNet-size networks become their small CPU siblings at 32 px,
#   vit_b_16 -> vit_tiny, convnext_tiny -> convnext_micro (a step of the big ones takes minutes here),
#   and inpainting's --crop-size 128 stays;
# - --init imagenet reads torchvision's weights from the local hub cache, which a test machine
#   lacks: the SimCLR row's checkpoint stands in (the row names both);
# - ckpt.pth.tar is the SimCLR row's checkpoint_last (main_distill.py's teacher too), runs/demo its output folder;
# - evaluation rows write into the test's folder (--output-dir, export_backbone's -o);
# - sbatch (SLURM) and bench/gpu_check.sh (a GPU) are not run; tools/inspection_data.py writes a
#   small set (--images 120 --size 48).
ARCH_FOR_CPU = {"vit_b_16": ["vit_tiny", "--crop-size", "32"], "convnext_tiny": ["convnext_micro", "--crop-size", "32"]}
PRETRAINING = ("main_simclr.py", "main_moco.py", "main_moco_v3.py", "main_byol.py", "main_dino.py",
               "main_distill.py", "main_inpaint.py")
NOT_RUN = ("sbatch", "bench/gpu_check.sh")


def readme_rows():
    """The command column of README's table of scripts, in order."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    table = text.split("## The scripts and their documents", 1)[1].split("\n\n", 2)[2]
    rows = [line for line in table.split("\n\n")[0].splitlines() if line.startswith("|") and "`" in line]
    return [re.findall(r"`([^`]*)`", row.split("|")[2])[0] for row in rows]


def runnable(command: str, data: str, out: str, ckpt: str, run_dir: str):
    """`command` as the test runs it: (script, argv), or None for the rows not run here."""
    words = shlex.split(command)
    if words[0] != "python" or any(n in command for n in NOT_RUN):
        return None
    script, argv = words[1], words[2:]
    name = os.path.splitext(os.path.basename(script))[0]
    subs = {"DATA": data, "ckpt.pth.tar": ckpt, "runs/demo": run_dir, "imagenet": ckpt,
            "runs/inspection": os.path.join(out, "inspection")}
    argv = [subs.get(a, a) for a in argv]
    if "-a" in argv and argv[argv.index("-a") + 1] in ARCH_FOR_CPU:
        i = argv.index("-a") + 1
        argv[i:i + 1] = ARCH_FOR_CPU[argv[i]]
    if script in PRETRAINING:
        argv += ["--epochs", "1", "-j", "0", "--output-dir", os.path.join(out, f"{name}_{len(os.listdir(out))}")]
    elif script in ("main_lincls.py", "main_knn.py", "main_curate.py"):
        argv += ["-j", "0", "--output-dir", os.path.join(out, f"{name}_{len(os.listdir(out))}")]
    elif script == "export_backbone.py":
        argv += ["-o", os.path.join(out, "exported.pth")]
    elif script == "plot_run.py":
        argv += ["-o", os.path.join(out, "run.png")]
    elif script == "tools/inspection_data.py":
        argv += ["--images", "120", "--size", "48"]
    return script, argv


def test_readme_rows_are_parsed():
    commands = readme_rows()
    assert commands[0].startswith("python main_simclr.py DATA") and len(commands) >= 12
    assert any(c.startswith("python main_moco_v3.py DATA -a vit_b_16") for c in commands)
    scripts = {shlex.split(c)[1] for c in commands if c.startswith("python ")}
    assert {"main_simclr.py", "main_moco.py", "main_moco_v3.py", "main_inpaint.py", "main_lincls.py", "main_knn.py",
            "main_curate.py", "export_backbone.py", "plot_run.py", "tools/inspection_data.py"} <= scripts


PARTS = 2  # the rows are dealt to this many tests, so that xdist's workers share them


@pytest.mark.long
@pytest.mark.slow
@pytest.mark.parametrize("part", range(PARTS))
def test_every_readme_row_runs_on_a_small_folder(tmp_path, capsys, part):
    """A folder of 3 classes x 80 train and 20 val 32 px images (300 in all), each row in README's
    order with the changes listed at the top of this file; the SimCLR row (first) gives the
    checkpoint the evaluation rows read and the MoCo row the run folder plot_run.py plots. Each
    runs through its script's main(argv) in this process, as `python script` would (the
    interpreter's start-up was half of this test's time). Part k runs the rows k, k + PARTS, ...,
    and before them the SimCLR and MoCo rows where the part needs their outputs."""
    data = write_image_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=80, size=32, split_dirs=("train",))
    write_image_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=20, size=32, seed=1, split_dirs=("val",))
    out = tmp_path / "runs"
    out.mkdir()
    ckpt = run_dir = None
    ran = []
    for i, command in enumerate(readme_rows()):
        job = runnable(command, data, str(out), ckpt or "", run_dir or "")
        if job is None:
            continue
        script, argv = job
        provider = (script == "main_simclr.py" and ckpt is None) or (script == "main_moco.py" and run_dir is None)
        if i % PARTS != part and not provider:
            continue
        proc = run_inline(capsys, importlib.import_module(script[:-3].replace("/", ".")).main, argv)
        ran.append(script)
        if script == "main_simclr.py" and ckpt is None:
            ckpt = os.path.join(argv[argv.index("--output-dir") + 1], "checkpoint_last.pth.tar")
        if script == "main_moco.py" and run_dir is None:
            run_dir = argv[argv.index("--output-dir") + 1]
        if script == "main_moco_v3.py":  # 4096 > the 192 images it trains on (240, 48 held out for the payoff):
            # the batch fits the data, the ViT gets AdamW's rate
            assert "-b 4096 (not given) is more than the 192 images: -b 128" in proc.stdout
            assert "set: --lr 0.00015 --wd 0.1 --moco-t 0.2" in proc.stdout
    assert len(ran) >= 3


def _v3_args(argv):
    args = main_moco_v3.get_args_parser().parse_args(["DATA"] + argv)
    args.optimizer = args.optimizer or ("adamw" if main_moco_v3.is_vit(args.arch) else "lars")
    main_moco_v3.fill_recipe_defaults(args)
    return args


def test_moco_v3_defaults_follow_the_optimizer_and_family(capsys):
    """moco-v3's recipes: a ViT gets AdamW at 1.5e-4 x B/256, wd 0.1, T 0.2; a ResNet LARS at
    0.6, wd 1e-6, T 1.0; the optimizer picks lr and wd, the family T; a given flag wins."""
    vit = _v3_args(["-a", "vit_b_16"])
    assert (vit.optimizer, vit.lr, vit.weight_decay, vit.moco_t) == ("adamw", 1.5e-4, 0.1, 0.2)
    assert "=> moco-v3's defaults for adamw and -a vit_b_16 set: --lr 0.00015 --wd 0.1 --moco-t 0.2" in \
        capsys.readouterr().out
    resnet = _v3_args(["-a", "resnet50"])
    assert (resnet.optimizer, resnet.lr, resnet.weight_decay, resnet.moco_t) == ("lars", 0.6, 1e-6, 1.0)
    mixed = _v3_args(["-a", "resnet50", "--optimizer", "adamw", "--lr", "1e-3"])
    assert (mixed.lr, mixed.weight_decay, mixed.moco_t) == (1e-3, 0.1, 1.0)
    assert "(kept from the command line: --lr)" in capsys.readouterr().out
    given = _v3_args(["-a", "vit_b_16", "--lr", "0.5", "--wd", "0", "--moco-t", "0.7"])
    assert (given.lr, given.weight_decay, given.moco_t) == (0.5, 0.0, 0.7)
    assert "moco-v3's defaults" not in capsys.readouterr().out


def test_a_default_batch_larger_than_the_data_fits_it_and_a_given_one_is_kept(capsys):
    args = argparse.Namespace(batch_size=4096, given_flags=[])
    fit_default_batch(args, images=300, world=1)
    assert args.batch_size == 256 and "-b 4096 (not given) is more than the 300 images: -b 256" in capsys.readouterr().out
    args = argparse.Namespace(batch_size=4096, given_flags=[])
    fit_default_batch(args, images=300, world=3)  # a multiple of the processes
    assert args.batch_size == 255 and "-b 255 instead" in capsys.readouterr().out
    args = argparse.Namespace(batch_size=4096, given_flags=["batch_size"])
    fit_default_batch(args, images=300, world=1)
    assert args.batch_size == 4096 and capsys.readouterr().out == ""
    args = argparse.Namespace(batch_size=256, given_flags=[])
    fit_default_batch(args, images=300, world=1)
    assert args.batch_size == 256
