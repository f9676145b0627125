"""Shared fixtures: a fresh plugin manager per test that changes plugins, small models."""

from __future__ import annotations

import pytest
import torch

from mslim_core import plugins as plugin_module

# small tensors dominate the suite: one thread is faster and steadier on shared 2-core machines
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    """Every test starts from seed 0 and one intra-op thread, whatever the test before it set."""
    torch.manual_seed(0)
    torch.set_num_threads(1)


@pytest.fixture
def fresh_plugins(monkeypatch: pytest.MonkeyPatch):
    """A plugin manager rebuilt from entry points for this test, forgotten afterwards."""
    monkeypatch.delenv(plugin_module.STRICT_ENV, raising=False)
    monkeypatch.delenv(plugin_module.DISABLE_ENV, raising=False)
    plugin_module.reset_plugin_manager()
    yield plugin_module.get_plugin_manager()
    plugin_module.reset_plugin_manager()
