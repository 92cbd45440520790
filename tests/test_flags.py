"""The scripts' flags speak one language: a flag two scripts share has one type, one style,
one set of choices and one default there, or is listed below as deliberately different with
its reason; every on/off flag is a switch (--x / --no-x); no --help section lists more than
MAX_GROUP flags; every --lr says whether it is absolute or scaled by the batch; old spellings
and old checkpoints' arg names still work. Planted mismatches show each check can fail."""
import argparse
import importlib
from typing import Dict, List, Tuple

import pytest
import torch
from conftest import SYNTHETIC, run_main

from common.ckpt.io import load_checkpoint
from common.cli import ArgumentParser, switch

# every script with a command line (tools/make_flags.py's list)
SCRIPTS = ("main_moco", "main_moco_v3", "main_simclr", "main_byol", "main_dino", "main_distill", "main_inpaint",
           "main_lincls", "main_knn", "main_curate", "export_backbone", "plot_run")
MAX_GROUP = 12  # flags in one --help section
FIELDS = ("style", "type", "nargs", "choices", "default")

# (flag, field) -> why the scripts that share the flag differ there. Keep each reason one line.
DIFFERENT: Dict[Tuple[str, str], str] = {
    ("--lr", "default"): "each method's reference value (moco 0.03, SimCLR 0.3, ...); None: chosen by optimizer/head",
    ("--epochs", "default"): "each method's reference schedule length",
    ("--batch-size", "default"): "each method's reference batch (moco 256, moco-v3 4096, BYOL 512, inpaint 128)",
    ("--schedule", "default"): "step epochs of the reference recipes that have a step schedule (moco, lincls)",
    ("--cos", "default"): "SimCLR and MoCo v3 default to cosine, moco and lincls to steps (their references)",
    ("--warmup-epochs", "default"): "SimCLR, MoCo v3 warm up 10 epochs (their papers), the others not; BYOL None: by method",
    ("--wd", "default"): "each method's reference weight decay; None: chosen by optimizer (moco-v3) or probe (lincls)",
    ("--save-freq", "default"): "main_lincls keeps checkpoint_last and model_best only (the reference's)",
    ("--arch", "default"): "None where --pretrained's checkpoint decides the network (follow_checkpoint)",
    ("--arch", "choices"): "export_backbone.py checks its -a against the known names; the others take any name",
    ("--seed", "default"): "main_knn/main_curate 0: a rerun draws the same queries and folds; training: drawn",
    ("--moco-dim", "default"): "moco v1/v2 128, moco-v3 256 (their references)",
    ("--proj-dim", "default"): "moco 128, moco-v3 256, SimCLR 128 (references); BYOL None: 256, SimSiam 2048",
    ("--proj-hidden-dim", "default"): "moco-v3 4096; SimCLR None: the backbone's feature width",
    ("--moco-m", "default"): "moco 0.999 (a queue of old keys), moco-v3 0.99 (its reference)",
    ("--moco-m-cos", "default"): "moco-v3's reference raises the momentum by cosine, moco v1/v2's keeps it fixed",
    ("--moco-t", "default"): "moco 0.07; moco-v3 None: 0.2 for ViTs, 1.0 otherwise (its reference)",
    ("--temperature", "default"): "moco 0.07, SimCLR 0.1, moco-v3 None (by family), distill 0.2 (SEED): references",
    ("--optimizer", "choices"): "SimCLR trains with lars/sgd/adam, moco-v3 with its reference's lars/adamw",
    ("--optimizer", "default"): "SimCLR lars; moco-v3 None: adamw for ViTs else lars; BYOL None: lars/SimSiam sgd; distill sgd",
    ("--resume", "style"): "main_curate --resume continues in --output-dir (no checkpoint path to name)",
    ("--resume", "type"): "main_curate --resume is a switch; the training scripts take a checkpoint PATH",
    ("--resume", "default"): "main_curate --resume is a switch (off); the training scripts' is a path ('')",
    ("--resume", "nargs"): "main_curate --resume is a switch; the training scripts' takes one PATH",
}


def parsers() -> Dict[str, argparse.ArgumentParser]:
    return {name: importlib.import_module(name).get_args_parser() for name in SCRIPTS}


def visible(parser: argparse.ArgumentParser) -> List[argparse.Action]:
    return [a for a in parser._actions if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]


def names(action: argparse.Action) -> List[str]:
    """The flag's spellings a user types, short ones (-b) left to their long form."""
    long = [s for s in action.option_strings if s.startswith("--") and not s.startswith("--no-")]
    return long or [s for s in action.option_strings if not s.startswith("--no-")]


def signature(action: argparse.Action) -> Dict[str, object]:
    return {"primary": names(action)[0], "style": "switch" if action.nargs == 0 else "value",
            "type": getattr(action.type, "__name__", action.type) if action.nargs != 0 else bool,
            "nargs": action.nargs, "choices": tuple(action.choices) if action.choices is not None else None,
            "default": action.default}


def mismatches(by_script: Dict[str, argparse.ArgumentParser],
               declared: Dict[Tuple[str, str], str]) -> List[str]:
    """One line per (flag, field) where scripts sharing a flag differ and `declared` has no reason."""
    table: Dict[str, Dict[str, Dict[str, object]]] = {}
    for script, parser in by_script.items():
        for action in visible(parser):
            if action.option_strings:
                for name in names(action):
                    table.setdefault(name, {})[script] = signature(action)
    problems = []
    for name, seen in sorted(table.items()):
        for field in FIELDS if len(seen) > 1 else ():
            values = {script: sig[field] for script, sig in seen.items()}
            reasons = {(name, field)} | {(sig["primary"], field) for sig in seen.values()}  # --lr for --learning-rate
            if len({repr(v) for v in values.values()}) > 1 and not reasons & declared.keys():
                problems.append(f"{name} {field}: " + ", ".join(f"{s} {v!r}" for s, v in sorted(values.items())))
    return problems


def not_switches(parser: argparse.ArgumentParser) -> List[str]:
    """On/off flags made otherwise than as a switch (store_true, store_false, a bare --no-x)."""
    return [a.option_strings[0] for a in visible(parser)
            if a.nargs == 0 and not isinstance(a, argparse.BooleanOptionalAction)]


def crowded_sections(parser: argparse.ArgumentParser) -> List[str]:
    return [f"{g.title}: {n}" for g in parser._action_groups
            if (n := len([a for a in g._group_actions if a in visible(parser)])) > MAX_GROUP]


# ---------------------------------------------------------------- the scripts


def test_a_shared_flag_means_the_same_in_every_script():
    assert mismatches(parsers(), DIFFERENT) == []


def test_every_declared_difference_is_still_a_difference():
    """A declared reason whose scripts now agree (or whose flag is gone) is dropped here."""
    stale = [key for key in DIFFERENT if not any(line.startswith(f"{key[0]} {key[1]}:")
                                                 for line in mismatches(parsers(), {}))]
    assert stale == []


def test_every_on_off_flag_is_a_switch_with_both_spellings():
    assert {name: bad for name, p in parsers().items() if (bad := not_switches(p))} == {}


def test_no_help_section_lists_more_than_a_dozen_flags():
    assert {name: bad for name, p in parsers().items() if (bad := crowded_sections(p))} == {}
    for name, p in parsers().items():  # argparse's catch-all holds only -h: every flag sits in a named group
        if name.startswith("main_"):  # (export_backbone.py's 7 flags and plot_run.py's 2 need no sections)
            assert [a.dest for a in p._optionals._group_actions if not isinstance(a, argparse._HelpAction)] == [], name


def test_every_lr_says_whether_it_is_absolute_or_scaled_by_the_batch():
    for name, p in parsers().items():
        for a in visible(p):
            if "--lr" in a.option_strings:
                assert "absolute" in a.help or "batch/256" in a.help, name


def test_old_spellings_and_the_aliases_parse():
    import export_backbone
    import main_inpaint
    import main_knn
    import main_moco
    import main_moco_v3
    import main_simclr
    assert main_inpaint.get_args_parser().parse_args(["--no-flip"]).flip is False
    assert main_inpaint.get_args_parser().parse_args([]).flip is True
    export = export_backbone.get_args_parser()
    assert export.parse_args(["c.pth", "--no-head"]).lincls_head is False
    assert export.parse_args(["c.pth", "--no-lincls-head"]).lincls_head is False
    assert export.parse_args(["c.pth"]).lincls_head is True
    knn = main_knn.get_args_parser()
    net = ["--pretrained", "none"]
    assert knn.parse_args(net + ["--temperature", "0.1"]).knn_t == 0.1
    assert knn.parse_args(net + ["--knn-t", "0.1"]).knn_t == 0.1
    assert knn.parse_args(net).knn_t == 0.07
    moco = main_moco.get_args_parser()
    assert moco.parse_args(["--moco-m-cos"]).moco_m_cos and not moco.parse_args([]).moco_m_cos
    args = moco.parse_args(["--temperature", "0.2", "--proj-dim", "64", "--no-mlp"])
    assert (args.moco_t, args.moco_dim, args.mlp) == (0.2, 64, False)
    assert {"mlp", "moco_dim", "moco_t"} <= set(args.given_flags)  # an alias counts as typed (--recipe small)
    v3 = main_moco_v3.get_args_parser().parse_args(["--no-moco-m-cos", "--proj-hidden-dim", "512", "--temperature",
                                                    "0.5"])
    assert (v3.moco_m_cos, v3.moco_mlp_dim, v3.moco_t) == (False, 512, 0.5)
    assert main_simclr.get_args_parser().parse_args(["--temperature", "0.5"]).temperature == 0.5


def test_the_shared_parser_records_typed_flags_of_every_kind():
    """given_flags (what --recipe small keeps) for a switch, an appended flag, a hidden old
    spelling and a required positional (export_backbone.py's checkpoint)."""
    import export_backbone
    import main_knn
    knn = main_knn.get_args_parser().parse_args(["--pretrained", "none", "--query", "a.jpg", "--query", "b.jpg",
                                                 "--temperature", "0.1", "--no-amp"])
    assert knn.query == ["a.jpg", "b.jpg"] and knn.knn_t == 0.1
    assert {"pretrained", "query", "knn_t", "amp"} <= set(knn.given_flags) and "seed" not in knn.given_flags
    assert main_knn.get_args_parser().parse_args(["--pretrained", "none"]).query == []
    export = export_backbone.get_args_parser().parse_args(["c.pth", "--no-head"])
    assert {"checkpoint", "lincls_head"} <= set(export.given_flags) and "arch" not in export.given_flags


# ---------------------------------------------------------------- the checks can fail


def test_planted_mismatches_are_found():
    real = parsers()
    a, b = ArgumentParser(), ArgumentParser()
    a.add_argument_group("x").add_argument("--knn-every", default=0, type=float)  # main_moco's is an int
    b.add_argument_group("x").add_argument("--amp-dtype", default="bf16", choices=("bf16", "fp32"))
    problems = mismatches({**real, "planted_a": a, "planted_b": b}, DIFFERENT)
    assert any(p.startswith("--knn-every type:") and "planted_a 'float'" in p for p in problems), problems
    assert any(p.startswith("--amp-dtype choices:") for p in problems), problems
    assert mismatches({"main_moco": real["main_moco"], "planted_a": a}, {("--knn-every", "type"): "planted"}) == []

    old = ArgumentParser()
    g = old.add_argument_group("x")
    g.add_argument("--no-flip", action="store_true")  # the old styles
    g.add_argument("--cos", action="store_true")
    switch(g, "--mlp", help="")
    assert not_switches(old) == ["--no-flip", "--cos"]
    for i in range(MAX_GROUP):
        g.add_argument(f"--f{i}")
    assert crowded_sections(old) == [f"x: {MAX_GROUP + 3}"]


# ---------------------------------------------------------------- old checkpoints


@pytest.mark.slow
def test_a_checkpoint_with_the_old_no_flip_arg_loads_and_resumes(tmp_path):
    """--no-flip (store_true, dest no_flip) became --flip/--no-flip (dest flip): a checkpoint
    written before keeps loading, its args read under the new name, and it resumes."""
    import main_inpaint
    argv = SYNTHETIC + ["--synthetic-size", "32", "-b", "16", "--patches", "2", "--patch-size", "8", "--seed", "3",
                        "-p", "100", "--no-payoff", "--no-flip", "--output-dir", str(tmp_path)]
    assert run_main(main_inpaint.main, argv + ["--epochs", "1"]) == 0
    path = tmp_path / "checkpoint_last.pth.tar"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["args"]["no_flip"] = not ckpt["args"].pop("flip")  # as the previous release wrote it
    torch.save(ckpt, path)
    loaded = load_checkpoint(str(path))["args"]
    assert loaded["flip"] is False and "no_flip" not in loaded
    assert run_main(main_inpaint.main, argv + ["--epochs", "2", "--resume", "auto"]) == 0
    resumed = torch.load(path, map_location="cpu", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["args"]["flip"] is False and "no_flip" not in resumed["args"]
