"""Safe persistence: mslim files round-trip in a fresh process, refuse pickled code, survive crashes."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import mslim
from mslim.models import available, create, example_input
from mslim_core import CheckpointError, MslimError, PruneReport, TargetNotReachedWarning, UnsafeCheckpointError
from mslim_core.fusion import fuse_model
from mslim_core.graph import ChannelGraph
from mslim_core.io import FORMAT_VERSION, describe_changes, file_kind, read_manifest
from mslim_core.rebuild import describe_modules

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "plugins"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model.eval()(x)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _randomise_norms(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)


def prune_randomly(model: nn.Module, x: torch.Tensor, seed: int = 0, fraction: float = 0.3) -> nn.Module:
    """Remove a random `fraction` of every unit's channels through ChannelGraph, then fold conv+BN."""
    _randomise_norms(model, seed)
    graph = ChannelGraph(model, x)
    gen = torch.Generator().manual_seed(seed)
    for unit in graph.units:
        k = int(unit.channels * fraction)
        if k == 0:
            continue
        idxs = graph.tied_channels(unit, torch.randperm(unit.channels, generator=gen)[:k])
        if idxs.numel() < unit.channels:
            graph.remove_channels(unit, idxs)
    fuse_model(model.eval(), x)
    return model


_LOADER = r"""
import sys, torch
torch.set_num_threads(1)
import mslim
from mslim.models import create
folder = sys.argv[2]
for item in sys.argv[1].split(","):
    stem, name = item.split(":")
    model = mslim.load(f"{folder}/{stem}.mslim", model=lambda: create(name))
    x = torch.load(f"{folder}/{stem}.input.pt", weights_only=True)
    with torch.no_grad():
        out = model.eval()(x)
    out = list(out) if isinstance(out, (tuple, list)) else [out]
    torch.save(out, f"{folder}/{stem}.fresh.pt")
print("ok")
"""


def _load_in_fresh_process(folder: Path, items: list[tuple[str, str]]) -> None:
    """Load each ``folder/stem.mslim`` onto ``create(model)`` in a new interpreter; outputs go to stem.fresh.pt."""
    if not items:
        return
    proc = subprocess.run(
        [sys.executable, "-c", _LOADER, ",".join(f"{stem}:{name}" for stem, name in items), str(folder)],
        capture_output=True, text=True, env=_env(), timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _assert_same_outputs(fresh: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(fresh) == len(expected)
    for got, want in zip(fresh, expected):
        assert got.shape == want.shape
        # another process may pick other conv kernels: equal up to float32 rounding
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(1.0, float(want.abs().max())))


# the deep ones run with `-m slow`; the default run keeps residual, depthwise, concat, flatten->linear
# and multi-output (detection) models
_SLOW_ZOO = {"resnet56", "resnet110", "resnet50"}
_ZOO_PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_ZOO else n for n in available()]
_ROUNDTRIP_TEST = "test_pruned_fused_zoo_model_round_trips_in_a_fresh_process"


@pytest.fixture(scope="module")
def zoo_roundtrip(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, list[torch.Tensor]]]:
    """The selected zoo models pruned and fused here, saved, then loaded back in one fresh Python process."""
    names = sorted({
        item.callspec.params["name"] for item in request.session.items
        if getattr(item, "originalname", "") == _ROUNDTRIP_TEST
    })
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("zoo")
    expected: dict[str, list[torch.Tensor]] = {}
    for name in names:
        x = example_input(name, batch=2)
        model = prune_randomly(create(name), x)
        mslim.save(model, folder / f"{name}.mslim", example_inputs=x[:1])
        torch.save(x, folder / f"{name}.input.pt")
        expected[name] = _outputs(model, x)
    _load_in_fresh_process(folder, [(n, n) for n in names])
    return folder, expected


@pytest.mark.parametrize("name", _ZOO_PARAMS)
def test_pruned_fused_zoo_model_round_trips_in_a_fresh_process(zoo_roundtrip, name: str) -> None:
    folder, expected = zoo_roundtrip
    _assert_same_outputs(torch.load(folder / f"{name}.fresh.pt", weights_only=True), expected[name])
    manifest = read_manifest(folder / f"{name}.mslim")
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["mslim_version"] == mslim.__version__
    # the file records pruned widths: some conv is narrower than in the original
    changes = describe_changes(folder / f"{name}.mslim", create(name))
    kinds = {c.kind for c in changes}
    assert "resized" in kinds and "replaced" in kinds  # narrower convs; BNs folded into Identity


def _algorithms() -> list[str]:
    return sorted(a.name for a in mslim.algorithms())


def _prune_with(algo: str, name: str, x: torch.Tensor) -> tuple[nn.Module, PruneReport]:
    """Prune a zoo model with a registered algorithm; training ones get a few steps on random data."""
    model = create(name)
    _randomise_norms(model, 0)
    session = mslim.prepare(model, algo=algo, example_inputs=x, flops_target=0.6)
    if session.trains:
        opt = session.optimizer(lr=0.01)
        for _ in range(3):
            session.model(torch.randn_like(x)).sum().backward()
            session.after_backward()
            opt.step()
            opt.zero_grad()
            session.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TargetNotReachedWarning)  # a few steps need not reach the target
        return session.finalize()


def test_every_algorithm_round_trips_in_a_fresh_process(tmp_path: Path) -> None:
    expected: dict[str, list[torch.Tensor]] = {}
    for algo in _algorithms():
        x = example_input("resnet20", batch=2)
        model, report = _prune_with(algo, "resnet20", x)
        mslim.save(model, tmp_path / f"{algo}.mslim", report, original=create("resnet20"), example_inputs=x[:1])
        torch.save(x, tmp_path / f"{algo}.input.pt")
        expected[algo] = _outputs(model, x)
        manifest = read_manifest(tmp_path / f"{algo}.mslim")
        assert manifest["algorithm"] == algo and manifest["config"]["flops_target"] == 0.6
    _load_in_fresh_process(tmp_path, [(algo, "resnet20") for algo in expected])
    for algo, outputs in expected.items():
        _assert_same_outputs(torch.load(tmp_path / f"{algo}.fresh.pt", weights_only=True), outputs)


def _resnet20_pruned(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    x = example_input("resnet20", batch=2)
    return prune_randomly(create("resnet20"), x, seed=seed), x


@pytest.fixture(scope="module")
def saved_resnet20(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    model, x = _resnet20_pruned()
    path = tmp_path_factory.mktemp("r20") / "resnet20.mslim"
    report = PruneReport(algorithm="random", config={"fraction": 0.3}, macs_before=10, macs_after=5,
                         params_before=10, params_after=5)
    mslim.save(model, path, report, original=create("resnet20"), example_inputs=x)
    return path, model, x


def test_manifest_records_algorithm_config_changes_and_shapes(saved_resnet20) -> None:
    path, model, _ = saved_resnet20
    manifest = read_manifest(path)
    assert manifest["format"] == "mslim.model"
    assert manifest["algorithm"] == "random" and manifest["config"] == {"fraction": 0.3}
    assert manifest["model_class"] == "mslim.models.cifar_resnet.CifarResNet"
    by_name = {m["name"]: m for m in manifest["modules"]}
    conv = model.get_submodule("layer1.0.conv1")
    assert by_name["layer1.0.conv1"]["args"]["out_channels"] == conv.weight.shape[0] < 16
    assert by_name["layer1.0.conv1"]["args"]["bias"] is True  # gained by folding its BN
    assert by_name["layer1.0.bn1"]["type"] == "torch.nn.Identity"
    changes = {c["name"]: c for c in manifest["changes"]}
    assert changes["layer1.0.bn1"]["kind"] == "replaced"
    assert changes["layer1.0.bn1"]["before"]["type"] == "torch.nn.BatchNorm2d"
    assert changes["layer1.0.conv1"]["kind"] == "resized"
    assert changes["layer1.0.conv1"]["before"]["args"]["out_channels"] == 16
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == ["manifest.json", "probe.pt", "weights.pt"]


def test_load_returns_equal_model_and_never_touches_the_given_one(saved_resnet20) -> None:
    path, model, x = saved_resnet20
    fresh = create("resnet20")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    structure = describe_modules(fresh)
    loaded = mslim.load(path, model=fresh)
    assert loaded is not fresh
    torch.testing.assert_close(_outputs(loaded, x), _outputs(model, x), rtol=0, atol=0)
    assert describe_modules(fresh) == structure
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())
    assert not loaded.training


def test_crafted_file_that_cannot_be_rebuilt_leaves_model_untouched(saved_resnet20, tmp_path: Path) -> None:
    path, _, _ = saved_resnet20
    manifest = read_manifest(path)
    for entry in manifest["modules"]:
        if entry["name"] == "layer3.2.conv2":
            entry["type"] = "evil.module.Backdoor"
    bad = tmp_path / "bad.mslim"
    _rewrite(path, bad, manifest=manifest)
    fresh = create("resnet20")
    structure = describe_modules(fresh)
    with pytest.raises(CheckpointError, match=r"type mismatch at layer3\.2\.conv2: the file has evil\.module\.Backdoor"):
        mslim.load(bad, model=fresh)
    assert describe_modules(fresh) == structure


def _rewrite(src: Path, dst: Path, manifest: dict | None = None, members: dict[str, bytes] | None = None) -> None:
    with zipfile.ZipFile(src) as archive:
        files = {n: archive.read(n) for n in archive.namelist()}
    if manifest is not None:
        files["manifest.json"] = json.dumps(manifest).encode()
    files.update(members or {})
    with zipfile.ZipFile(dst, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)


# -- unsafe inputs -------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a file: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _malicious_files(folder: Path, marker: Path) -> dict[str, Path]:
    payload = {"state_dict": {"w": torch.zeros(2)}, "hook": _Payload(marker)}
    files = {}
    files["torch-zip"] = folder / "zip.pt"
    torch.save(payload, files["torch-zip"])
    files["torch-legacy"] = folder / "legacy.pt"
    torch.save(payload, files["torch-legacy"], _use_new_zipfile_serialization=False)
    for proto in (2, 5):
        files[f"pickle-{proto}"] = folder / f"raw{proto}.pkl"
        files[f"pickle-{proto}"].write_bytes(pickle.dumps(payload, protocol=proto))
    return files


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    files = _malicious_files(tmp_path, marker)
    assert not marker.exists()
    for kind, path in files.items():
        with pytest.raises(UnsafeCheckpointError, match=r"imports Python objects \(.*(io|builtins)\.open.*\).*arbitrary code"):
            mslim.load(path, model=create("resnet20"))
        from mslim_core.checkpoint import load_checkpoint

        with pytest.raises(UnsafeCheckpointError, match="arbitrary code"):
            load_checkpoint(path)
        assert not marker.exists(), f"loading the {kind} payload ran its code"


def test_malicious_weights_inside_an_mslim_file_are_refused(saved_resnet20, tmp_path: Path) -> None:
    path, _, _ = saved_resnet20
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"conv1.weight": _Payload(marker)}, evil)
    bad = tmp_path / "bad.mslim"
    _rewrite(path, bad, members={"weights.pt": evil.read_bytes()})
    with pytest.raises(UnsafeCheckpointError, match=r"the weights in .*open"):
        mslim.load(bad, model=create("resnet20"), trust=True)  # trust never applies inside an mslim file
    assert not marker.exists()


def test_whole_pickled_module_is_refused_with_conversion_advice_unless_trusted(tmp_path: Path) -> None:
    model = create("resnet20").eval()
    path = tmp_path / "best_pretrained.pt"
    torch.save(model, path)  # what the seed's workflow does
    with pytest.raises(UnsafeCheckpointError) as info:
        mslim.load(path, model=create("resnet20"))
    message = str(info.value)
    assert "mslim.models.cifar_resnet.CifarResNet" in message
    assert "arbitrary code" in message and "mslim.save(model" in message and "trust=True" in message
    trusted = mslim.load(path, trust=True)
    x = example_input("resnet20")
    torch.testing.assert_close(_outputs(trusted, x), _outputs(model, x))


def test_plain_state_dict_loads_strictly_onto_the_model(tmp_path: Path) -> None:
    model = create("resnet20").eval()
    path = tmp_path / "state.pt"
    torch.save(model.state_dict(), path)
    loaded = mslim.load(path, model=create("resnet20"))
    x = example_input("resnet20")
    torch.testing.assert_close(_outputs(loaded, x), _outputs(model, x))
    pruned, _ = _resnet20_pruned()
    torch.save(pruned.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"plain state dict \(no mslim manifest\) that does not fit"):
        mslim.load(path, model=create("resnet20"))


# -- damaged and mismatched files ----------------------------------------------------------------


def test_truncated_file_is_a_clear_error(saved_resnet20, tmp_path: Path) -> None:
    path, _, _ = saved_resnet20
    data = path.read_bytes()
    bad = tmp_path / "cut.mslim"
    for cut in (len(data) // 2, len(data) - 10, 100):
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="is truncated or corrupted"):
            mslim.load(bad, model=create("resnet20"))
    bad.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\)"):
        mslim.load(bad, model=create("resnet20"))


def test_corrupted_weights_fail_the_zip_checksum(saved_resnet20, tmp_path: Path) -> None:
    path, _, _ = saved_resnet20
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("weights.pt")
    start = info.header_offset + 30 + len(info.filename) + 1000
    data[start:start + 8] = bytes(8 * [0x5A])
    bad = tmp_path / "flipped.mslim"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"truncated or corrupted \(BadZipFile: Bad CRC-32"):
        mslim.load(bad, model=create("resnet20"))


def test_checkpoint_from_another_model_is_refused(saved_resnet20) -> None:
    path, _, _ = saved_resnet20
    with pytest.raises(CheckpointError, match=r"layer1 \(Sequential\) holds modules .* another model"):
        mslim.load(path, model=create("resnet56"))
    with pytest.raises(CheckpointError, match=r"holds a pruned mslim\.models\.cifar_resnet\.CifarResNet but model= is a mslim\.models\.vgg\.VGG"):
        mslim.load(path, model=create("vgg16_bn"))
    with pytest.raises(CheckpointError, match=r"outputs of shapes \[\(2, 100\)\] but the saved model gave \[\(2, 10\)\]"):
        mslim.load(path, model=create("resnet20", num_classes=100))
    with pytest.raises(CheckpointError, match=r"needs model=: the freshly built original"):
        mslim.load(path)


def test_conv_geometry_mismatch_means_another_model(saved_resnet20, tmp_path: Path) -> None:
    path, _, _ = saved_resnet20
    manifest = read_manifest(path)
    for entry in manifest["modules"]:
        if entry["name"] == "layer2.0.conv1":
            entry["args"]["stride"] = [1, 1]
    bad = tmp_path / "stride.mslim"
    _rewrite(path, bad, manifest=manifest)
    with pytest.raises(CheckpointError, match=r"layer2\.0\.conv1 \(Conv2d\) has stride=\[2, 2\] in the model but \[1, 1\] in the file"):
        mslim.load(bad, model=create("resnet20"))


def test_file_from_a_newer_format_version_is_refused(saved_resnet20, tmp_path: Path) -> None:
    path, _, _ = saved_resnet20
    manifest = read_manifest(path)
    manifest["format_version"] = FORMAT_VERSION + 1
    manifest["mslim_version"] = "9.0.0"
    newer = tmp_path / "newer.mslim"
    _rewrite(path, newer, manifest=manifest)
    with pytest.raises(CheckpointError, match=rf"newer mslim \(file format version {FORMAT_VERSION + 1}, mslim 9\.0\.0\).*upgrade mslim"):
        mslim.load(newer, model=create("resnet20"))


def test_probe_catches_a_model_that_computes_differently(saved_resnet20) -> None:
    path, _, _ = saved_resnet20

    model = create("resnet20")
    # same class, same modules, yet it computes something else: only the probe can tell
    model.register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(CheckpointError, match="does not reproduce the saved model's outputs"):
        mslim.load(path, model=model)
    assert mslim.load(path, model=model, verify=False) is not None


def test_file_kind_sniffing(saved_resnet20, tmp_path: Path) -> None:
    path, model, _ = saved_resnet20
    assert file_kind(path) == "mslim"
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    assert file_kind(tmp_path / "sd.pt") == "torch"
    (tmp_path / "junk").write_bytes(b"hello world")
    assert file_kind(tmp_path / "junk") == "unknown"
    with pytest.raises(CheckpointError, match="not a model file mslim can read"):
        mslim.load(tmp_path / "junk", model=create("resnet20"))
    with pytest.raises(CheckpointError, match="no such file"):
        mslim.load(tmp_path / "missing.mslim", model=create("resnet20"))


# -- structural changes beyond pruning ----------------------------------------------------------


def test_modules_added_and_deleted_by_a_custom_fusion_round_trip(tmp_path: Path) -> None:
    """yolo_elan's RepConv.fuse() adds a conv attribute and deletes its branches."""
    model = create("yolo_elan").eval()
    _randomise_norms(model, 3)
    for module in model.modules():
        if type(module).__name__ == "RepConv":
            module.fuse()
    x = example_input("yolo_elan")
    mslim.save(model, tmp_path / "y.mslim", example_inputs=x)
    loaded = mslim.load(tmp_path / "y.mslim", model=lambda: create("yolo_elan"))
    torch.testing.assert_close(_outputs(loaded, x), _outputs(model, x), rtol=0, atol=0)
    kinds = {(c.name, c.kind) for c in describe_changes(tmp_path / "y.mslim", create("yolo_elan"))}
    assert {("rep3.fused", "added"), ("rep3.branch3x3", "removed")} <= kinds


def test_shared_modules_stay_shared_and_identity_replacements_load(tmp_path: Path) -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = self.a  # the same layer under two names
            self.norm = nn.BatchNorm1d(6)
            self.head = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.norm(self.b(self.a(x[:, :4])[:, :4])))

    original = Twice()
    model = Twice()
    model.a = nn.Linear(4, 6, bias=False)
    model.b = model.a
    model.norm = nn.Identity()
    mslim.save(model, tmp_path / "t.mslim")
    loaded = mslim.load(tmp_path / "t.mslim", model=original)
    assert loaded.a is loaded.b and loaded.a.bias is None and isinstance(loaded.norm, nn.Identity)
    x = torch.randn(5, 6)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))


def test_unrebuildable_layer_gives_a_clear_error(tmp_path: Path) -> None:
    class Custom(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(n))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale

    original = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model = nn.Sequential(nn.Linear(3, 4), Custom(4), nn.Linear(4, 2))
    mslim.save(model, tmp_path / "c.mslim")
    with pytest.raises(CheckpointError, match=r"type mismatch at 1: the file has .*Custom, the model has torch\.nn\.ReLU; mslim rebuilds only standard layers \(BatchNorm1d"):
        mslim.load(tmp_path / "c.mslim", model=original)
    grown = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), Custom(2))
    mslim.save(grown, tmp_path / "g.mslim")
    with pytest.raises(CheckpointError, match=r"holds modules \[0, 1, 2\] in the given model but \[0, 1, 2, 3\] in the file"):
        mslim.load(tmp_path / "g.mslim", model=original)


def test_save_rejects_non_modules_and_checks_against_the_original(tmp_path: Path) -> None:
    with pytest.raises(MslimError, match="needs a torch.nn.Module, got dict"):
        mslim.save({"w": torch.zeros(1)}, tmp_path / "x.mslim")
    model, _ = _resnet20_pruned()
    with pytest.raises(CheckpointError, match="original= is a mslim.models.vgg.VGG"):
        mslim.save(model, tmp_path / "x.mslim", original=create("vgg16_bn"))
    assert not (tmp_path / "x.mslim").exists()


# -- atomic writes -------------------------------------------------------------------------------


def test_write_interrupted_before_rename_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.mslim"
    old, x = _resnet20_pruned(seed=1)
    mslim.save(old, path)
    new, _ = _resnet20_pruned(seed=2)

    def crash(src, dst):  # the process dies between writing the temp file and renaming it
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        mslim.save(new, path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.mslim"]  # no temp file left behind
    loaded = mslim.load(path, model=create("resnet20"))
    torch.testing.assert_close(_outputs(loaded, x), _outputs(old, x), rtol=0, atol=0)


def test_write_interrupted_mid_file_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.mslim"
    old, x = _resnet20_pruned(seed=1)
    mslim.save(old, path)
    real = zipfile.ZipFile.writestr

    def interrupted(self, name, data, *args, **kwargs):
        if getattr(name, "filename", name) == "weights.pt":
            real(self, name, data[: len(data) // 2], *args, **kwargs)
            raise KeyboardInterrupt
        return real(self, name, data, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "writestr", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mslim.save(_resnet20_pruned(seed=2)[0], path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.mslim"]
    loaded = mslim.load(path, model=create("resnet20"))
    torch.testing.assert_close(_outputs(loaded, x), _outputs(old, x), rtol=0, atol=0)


# -- ONNX ----------------------------------------------------------------------------------------


def test_export_onnx_of_a_loaded_pruned_model(saved_resnet20, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    path, model, _ = saved_resnet20
    loaded = mslim.load(path, model=create("resnet20"))
    out = mslim.export_onnx(loaded, tmp_path / "m.onnx", example_input("resnet20"))
    onnx.checker.check_model(onnx.load(str(out)))
    x = example_input("resnet20", batch=3)  # the batch dimension is dynamic
    got = ReferenceEvaluator(str(out)).run(None, {"input": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), _outputs(model, x)[0], rtol=1e-4, atol=1e-5)


def test_export_onnx_without_onnx_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(MslimError, match=r"pip install 'mslim\[onnx\]'"):
        mslim.export_onnx(create("resnet20"), tmp_path / "m.onnx", example_input("resnet20"))
    assert not (tmp_path / "m.onnx").exists()


def test_cli_export(saved_resnet20, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnx")
    from mslim.cli.main import main

    path, _, _ = saved_resnet20
    out = tmp_path / "cli.onnx"
    assert main(["export", str(path), "--onnx", str(out), "--model", "resnet20"]) == 0
    assert out.exists() and "input shape (2, 3, 32, 32)" in capsys.readouterr().out  # the stored probe's shape
    assert main(["export", str(path), "--onnx", str(out), "--model", "vgg16_bn"]) == 2
    assert "holds a pruned mslim.models.cifar_resnet.CifarResNet" in capsys.readouterr().err
    assert main(["export", str(path), "--onnx", str(out)]) == 2
    assert "does not record the zoo model it was pruned from: pass --model NAME" in capsys.readouterr().err
    assert main(["export", str(path), "--onnx", str(out), "--model", "resnet20", "--input-shape", "1,3,a"]) == 2
    assert "--input-shape must be positive integers separated by commas, like 1,3,32,32; got '1,3,a'" in capsys.readouterr().err
    assert main(["export", str(path), "--onnx", str(out), "--model", "resnet20", "--input-shape", "1x3"]) == 2
    assert "the model failed on example_inputs of shape (1, 3)" in capsys.readouterr().err


def test_cli_export_uses_the_zoo_model_the_file_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnx")
    from mslim.cli.main import main

    model, _ = _resnet20_pruned()
    report = PruneReport(algorithm="random", macs_before=1, macs_after=1, params_before=1, params_after=1,
                         extra={"zoo_model": {"model": "resnet20", "num_classes": 10, "in_channels": 3}})
    mslim.save(model, tmp_path / "m.mslim", report)
    assert main(["export", str(tmp_path / "m.mslim"), "--onnx", str(tmp_path / "m.onnx")]) == 0
    assert "input shape (1, 3, 32, 32)" in capsys.readouterr().out


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    import os

    from mslim_core.atomic import atomic_write_text

    umask = os.umask(0o022)
    try:
        atomic_write_text("report", tmp_path / "report.json")
    finally:
        os.umask(umask)
    assert (os.stat(tmp_path / "report.json").st_mode & 0o777) == 0o644
