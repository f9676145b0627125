"""Every hook spec is documented in docs/writing-plugins.md and exercised by a test."""

from __future__ import annotations

from pathlib import Path

import pytest

from mslim_core import hookspecs
from mslim_core.plugins import HOOK_NAMES

ROOT = Path(__file__).resolve().parents[1]
SPEC_NAMES = sorted(n for n in dir(hookspecs) if n.startswith("mslim_"))


def test_hook_names_match_specs():
    assert sorted(HOOK_NAMES) == SPEC_NAMES


@pytest.mark.parametrize("hook", SPEC_NAMES)
def test_hook_is_documented(hook):
    guide = (ROOT / "docs" / "writing-plugins.md").read_text(encoding="utf-8")
    assert f"## `{hook}`" in guide, f"docs/writing-plugins.md has no section for {hook}"
    assert f"def {hook}(register)" in guide, f"docs/writing-plugins.md has no example implementing {hook}"


@pytest.mark.parametrize("hook", SPEC_NAMES)
def test_hook_is_tested(hook):
    users = [
        p.name
        for p in (ROOT / "tests").glob("test_*.py")
        if p.name != "test_hook_docs.py" and f"def {hook}(" in p.read_text(encoding="utf-8")
    ]
    assert users, f"no test implements {hook}"


@pytest.mark.parametrize("hook", SPEC_NAMES)
def test_hook_spec_has_docstring(hook):
    assert (getattr(hookspecs, hook).__doc__ or "").strip()
