"""The command line: listing verbs, JSON output, errors without tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mslim.cli import main
from tests.test_plugins import GOOD_PLUGIN, write_distribution
from tests.toy_pruner import ToyPlugin

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "mslim", *args], capture_output=True, text=True, env=full_env, cwd=ROOT)


def test_plugins_json_lists_first_party_plugins_with_versions():
    result = run_cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    records = {r["name"]: r for r in json.loads(result.stdout)}
    import mslim

    assert records["fusers"]["distribution"] == "mslim"
    assert records["fusers"]["version"] == mslim.__version__
    assert records["fusers"]["status"] == "loaded"


def test_algorithms_table_and_json(fresh_plugins, capsys):
    fresh_plugins.register(ToyPlugin(), name="toy-plugin")
    assert main(["algorithms"]) == 0
    out = capsys.readouterr().out
    assert "toy" in out and "Scales gradients while training" in out
    assert main(["algorithms", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"name": "toy", "plugin": "toy-plugin", "trains": True}.items() <= next(d for d in data if d["name"] == "toy").items()


def test_strict_plugin_failure_prints_message_without_traceback(tmp_path):
    write_distribution(tmp_path, "mslim-bad", "0.3", {"broken_e": "broken_e_mod"}, {"broken_e_mod": "raise ImportError('no')\n"})
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]), "MSLIM_STRICT_PLUGINS": "1"}
    result = run_cli("plugins", env=env)
    assert result.returncode == 2
    assert "mslim: error: plugin 'broken_e' (distribution mslim-bad 0.3) failed" in result.stderr
    assert "Traceback" not in result.stderr


def test_third_party_on_path_shows_in_algorithms(tmp_path):
    write_distribution(tmp_path, "mslim-echo-f", "2.0", {"echo_f": "echo_f_mod"}, {"echo_f_mod": GOOD_PLUGIN.format(tag="f")})
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = run_cli("algorithms", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert "echo-f" in {a["name"] for a in json.loads(result.stdout)}


def test_no_verb_prints_help(capsys):
    assert main([]) == 2
    assert "usage: mslim" in capsys.readouterr().out
