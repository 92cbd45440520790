"""The docs that are generated from the code stay in step with it."""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make_flags():
    spec = importlib.util.spec_from_file_location("make_flags", os.path.join(ROOT, "tools", "make_flags.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flag_reference_matches_the_parsers():
    """docs/flags.md is tools/make_flags.py's rendering of every script's get_args_parser()."""
    expected = _make_flags().render()
    with open(os.path.join(ROOT, "docs", "flags.md"), encoding="utf-8") as f:
        written = f.read()
    if written != expected:
        pytest.fail("docs/flags.md is out of date; run python tools/make_flags.py", pytrace=False)


def test_docs_link_to_sections_that_exist():
    """Every link into docs/flags.md from docs/*.md names a script section it has."""
    make_flags = _make_flags()
    anchors = {make_flags.anchor(m + ".py") for m in make_flags.SCRIPTS}
    docs = os.path.join(ROOT, "docs")
    for name in sorted(os.listdir(docs)):
        if not name.endswith(".md"):
            continue
        with open(os.path.join(docs, name), encoding="utf-8") as f:
            text = f.read()
        for part in text.split("flags.md#")[1:]:
            target = "#" + part.split(")", 1)[0]
            assert target in anchors, f"docs/{name} links to flags.md{target}, which docs/flags.md has no section for"
