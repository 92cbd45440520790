"""Writes docs/flags.md, the flag reference of every script, from the scripts' own argparse
parsers (`get_args_parser()`), so that `--help` stays the one source: one section per
script, one table (flag | default | help) per argument group.

    python tools/make_flags.py           # rewrite docs/flags.md
    python tools/make_flags.py --check   # exit 1 if docs/flags.md is out of date

tests/test_docs.py runs render() and fails when the file differs. The output depends only
on the parsers: programme names are fixed here, %(default)s-style expansions are done here,
and no argparse formatter runs, so terminal width never enters."""
import argparse
import importlib
import os
import sys
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

FLAGS_MD = os.path.join(ROOT, "docs", "flags.md")
# the scripts with a command line, as modules of the repository root; each has get_args_parser()
SCRIPTS = ("main_moco", "main_moco_v3", "main_simclr", "main_byol", "main_dino", "main_distill", "main_inpaint",
           "main_lincls", "main_knn", "main_curate", "export_backbone", "plot_run", "make_shards")

MAX_CHOICES = 12  # longer choice lists are shortened to their first names and "..."

HEADER = """# Command-line flags

Generated from the scripts' argparse parsers by `python tools/make_flags.py`; do not edit by
hand (tests/test_docs.py fails when this file and the parsers disagree). `python SCRIPT --help`
prints the same flags. A blank default means none, or a value computed at run time (the help
says how); on/off is a switch's default state; "required" a flag the script cannot run without.
"""


def anchor(script: str) -> str:
    """The GitHub anchor of a script's section, e.g. main_moco.py -> #main_mocopy."""
    return "#" + script.replace(".", "").lower()


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _expand_help(action: argparse.Action, prog: str) -> str:
    """argparse's %(default)s / %(choices)s / %(prog)s expansion of a help string, as its
    HelpFormatter._expand_help does, without a formatter (whose wrapping follows $COLUMNS)."""
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    for name, value in list(params.items()):
        if hasattr(value, "__name__"):
            params[name] = value.__name__
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(c) for c in params["choices"])
    params["prog"] = prog
    return (action.help or "") % params


def _default(action: argparse.Action) -> str:
    value = action.default
    if action.required:
        return "required"
    if value is None or value is argparse.SUPPRESS or (isinstance(value, str) and value == ""):
        return ""
    if action.nargs == 0 and isinstance(value, bool):  # a switch (store_true, --x/--no-x)
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value)
    return f"`{value}`"


def _flag(action: argparse.Action) -> str:
    if action.option_strings:
        names = ", ".join(f"`{s}`" for s in action.option_strings)
    else:  # a positional argument
        names = f"`{action.metavar or action.dest}`"
    if action.choices is not None:
        choices = [str(c) for c in action.choices]
        if len(choices) > MAX_CHOICES:  # e.g. every torchvision architecture: --help lists them
            choices = choices[:3] + ["..."]
        names += " {" + ", ".join(choices) + "}"
    return names


def script_section(module_name: str) -> List[str]:
    script = module_name + ".py"
    parser = importlib.import_module(module_name).get_args_parser()
    parser.prog = script  # argparse's default is the running program's name
    lines = [f"## {script}", ""]
    if parser.description:
        lines += [_cell(parser.description), ""]
    # argparse has no public API that lists a parser's groups and their actions (only
    # format_help, whose layout depends on the terminal width), hence the private
    # _action_groups / _group_actions here, and only here
    for group in parser._action_groups:
        actions = [a for a in group._group_actions
                   if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        title = ("positional arguments" if group is parser._positionals
                 else "options" if group is parser._optionals else group.title)
        lines += [f"### {script}: {title}", ""]
        if group.description:
            lines += [_cell(group.description), ""]
        lines += ["| flag | default | help |", "|---|---|---|"]
        lines += [f"| {_flag(a)} | {_cell(_default(a))} | {_cell(_expand_help(a, script))} |" for a in actions]
        lines.append("")
    return lines


def render() -> str:
    lines = [HEADER]
    lines += [f"- [{m}.py]({anchor(m + '.py')})" for m in SCRIPTS] + [""]
    for module_name in SCRIPTS:
        lines += script_section(module_name)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write docs/flags.md from the scripts' parsers")
    p.add_argument("--check", action="store_true", help="only compare; exit 1 if docs/flags.md is out of date")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        with open(FLAGS_MD, encoding="utf-8") as f:
            if f.read() != text:
                print("docs/flags.md is out of date; run python tools/make_flags.py", file=sys.stderr)
                return 1
        return 0
    with open(FLAGS_MD, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {os.path.relpath(FLAGS_MD, os.getcwd())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
