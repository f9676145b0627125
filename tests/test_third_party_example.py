"""The example third-party distribution installs, is discovered through its entry point, and works."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "third_party_plugin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """pip-install the example into a private target folder (no index needed)."""
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / "plugin"
    shutil.copytree(EXAMPLE, source)  # keep build leftovers out of the repository
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--no-index", "--target", str(target), str(source)],
        check=True, capture_output=True, text=True,
    )
    return target


def test_installed_plugin_is_listed_with_its_distribution(installed):
    env = {**os.environ, "PYTHONPATH": str(installed), "MSLIM_STRICT_PLUGINS": "1"}
    result = subprocess.run([sys.executable, "-m", "mslim", "plugins", "--json"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    record = next(r for r in json.loads(result.stdout) if r["name"] == "linf")
    assert (record["distribution"], record["version"], record["status"]) == ("mslim-linf", "0.1.0", "loaded")
    assert record["importances"] == ["linf"]


def test_magnitude_prunes_with_the_third_party_criterion(installed, monkeypatch, fresh_plugins):
    monkeypatch.syspath_prepend(str(installed))
    from mslim_core import plugins as plugin_module

    plugin_module.reset_plugin_manager()
    import mslim

    model = mslim.models.create("resnet20")
    x = mslim.models.example_input("resnet20")
    small, report = mslim.prune(model, algo="magnitude", importance="linf", example_inputs=x, flops_target=0.6)
    assert report.flops_ratio <= 0.61
    assert small(x).shape == (1, 10)
    # linf keeps, in each unit, the filters with the largest max |w|: check one independent unit
    assert report.config["importance"] == "linf"
