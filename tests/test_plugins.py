"""Plugin discovery through entry points, failure isolation, strict/disable switches, duplicates."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import mslim
from mslim_core import PluginError, hookimpl
from mslim_core import plugins as plugin_module
from tests.toy_pruner import ToyPlugin, ToyPruner


def write_distribution(root: Path, dist: str, version: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """A real installed-distribution layout (.dist-info with entry_points.txt) under ``root``."""
    # installers name the folder after the normalised name (dashes become underscores)
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = ["[mslim.plugins]"] + [f"{name} = {target}" for name, target in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))


GOOD_PLUGIN = """
    from mslim_core import Pruner, PrunerConfig, hookimpl

    class EchoPruner(Pruner):
        '''Returns the model unchanged (discovery test).'''
        name = "echo-{tag}"

    @hookimpl
    def mslim_register_pruners(register):
        register(EchoPruner)
"""


def test_installed_distribution_is_discovered(tmp_path, monkeypatch, fresh_plugins):
    write_distribution(tmp_path, "mslim-echo", "1.2.3", {"echo_a": "echo_a_mod"}, {"echo_a_mod": GOOD_PLUGIN.format(tag="a")})
    monkeypatch.syspath_prepend(str(tmp_path))
    plugin_module.reset_plugin_manager()
    names = {a.name: a for a in mslim.algorithms()}
    assert "echo-a" in names
    assert names["echo-a"].plugin == "echo_a"
    assert names["echo-a"].description == "Returns the model unchanged (discovery test)."
    record = next(r for r in mslim.plugins() if r.name == "echo_a")
    assert (record.distribution, record.version, record.status) == ("mslim-echo", "1.2.3", "loaded")
    assert record.hooks == ["mslim_register_pruners"]
    assert record.pruners == ["echo-a"]


def test_broken_plugin_is_reported_and_skipped(tmp_path, monkeypatch, fresh_plugins):
    write_distribution(
        tmp_path,
        "mslim-mixed",
        "0.1",
        {"echo_b": "echo_b_mod", "broken": "broken_mod"},
        {"echo_b_mod": GOOD_PLUGIN.format(tag="b"), "broken_mod": "raise RuntimeError('boom at import')\n"},
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    plugin_module.reset_plugin_manager()
    records = {r.name: r for r in mslim.plugins()}
    assert records["broken"].status == "failed"
    assert "RuntimeError: boom at import" in records["broken"].error
    assert records["broken"].distribution == "mslim-mixed"
    assert "echo-b" in {a.name for a in mslim.algorithms()}


def test_strict_mode_turns_failure_into_error(tmp_path, monkeypatch, fresh_plugins):
    write_distribution(tmp_path, "mslim-bad", "0.2", {"broken_c": "broken_c_mod"}, {"broken_c_mod": "import nonexistent_pkg_xyz\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("MSLIM_STRICT_PLUGINS", "1")
    plugin_module.reset_plugin_manager()
    with pytest.raises(PluginError, match=r"plugin 'broken_c' \(distribution mslim-bad 0.2\) failed: import failed"):
        mslim.plugins()


def test_disabled_plugin_is_not_loaded(tmp_path, monkeypatch, fresh_plugins):
    write_distribution(tmp_path, "mslim-echo-d", "1.0", {"echo_d": "echo_d_mod"}, {"echo_d_mod": GOOD_PLUGIN.format(tag="d")})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("MSLIM_DISABLE_PLUGINS", "echo_d, other")
    plugin_module.reset_plugin_manager()
    assert "echo-d" not in {a.name for a in mslim.algorithms()}
    assert {r.name: r.status for r in mslim.plugins()}["echo_d"] == "disabled"


def test_duplicate_algorithm_names_both_plugins(fresh_plugins):
    class Again:
        @hookimpl
        def mslim_register_pruners(self, register):
            register(ToyPruner)

    fresh_plugins.register(ToyPlugin(), name="toy-one")
    fresh_plugins.register(Again(), name="toy-two")
    with pytest.raises(PluginError, match=r"pruner 'toy' is registered by two plugins: 'toy-one' and 'toy-two'"):
        mslim.algorithms()


def test_invalid_registration_skips_only_that_plugin(fresh_plugins):
    class NotAPruner:
        name = "bogus"

    class Bad:
        @hookimpl
        def mslim_register_pruners(self, register):
            register(NotAPruner)

    fresh_plugins.register(Bad(), name="bad")
    fresh_plugins.register(ToyPlugin(), name="toy-ok")
    assert "toy" in {a.name for a in mslim.algorithms()}
    record = {r.name: r for r in mslim.plugins()}["bad"]
    assert record.status == "failed"
    assert "takes a mslim_core.Pruner subclass" in record.error


def test_unknown_hook_is_rejected(fresh_plugins):
    class Typo:
        @hookimpl
        def mslim_register_prunerz(self, register):
            pass

    record = fresh_plugins.register(Typo(), name="typo")
    assert record.status == "failed"
    assert "unknown hook(s) mslim_register_prunerz" in record.error


def test_each_hook_registers_into_its_registry(fresh_plugins):
    import torch.nn as nn

    class Crit:
        name = "ones"

        def scores(self, *args, **kwargs):
            return None

    class Rule:
        name = "id+id"
        pattern = (nn.Identity, nn.Identity)

        @staticmethod
        def fuse(a, b):
            return a

    class Everything:
        @hookimpl
        def mslim_register_pruners(self, register):
            register(ToyPruner)

        @hookimpl
        def mslim_register_importances(self, register):
            register(Crit())

        @hookimpl
        def mslim_register_fusers(self, register):
            register(Rule())

    fresh_plugins.register(Everything(), name="everything", distribution="local", version="0")
    registry = plugin_module.get_registry()
    assert registry.pruners["toy"] is ToyPruner
    assert registry.importances["ones"].name == "ones"
    assert any(r.name == "id+id" for r in registry.fusers)
    record = {r.name: r for r in mslim.plugins()}["everything"]
    assert record.hooks == ["mslim_register_fusers", "mslim_register_importances", "mslim_register_pruners"]
    assert (record.pruners, record.importances, record.fusers) == (["toy"], ["ones"], ["id+id"])


def test_invalid_importance_and_fuser_are_reported(fresh_plugins):
    class BadCrit:
        @hookimpl
        def mslim_register_importances(self, register):
            register(object())

    class BadRule:
        @hookimpl
        def mslim_register_fusers(self, register):
            register("conv+bn")

    fresh_plugins.register(BadCrit(), name="bad-crit")
    fresh_plugins.register(BadRule(), name="bad-rule")
    records = {r.name: r for r in mslim.plugins()}
    assert "needs a lower-case string `name`" in records["bad-crit"].error
    assert "needs a non-empty tuple `pattern`" in records["bad-rule"].error
