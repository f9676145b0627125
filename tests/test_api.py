"""prepare/prune dispatch, config validation messages, recipes and the session lifecycle."""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F

import mslim
from mslim_core import CheckpointError, ConfigError, GraphError, MslimError, UnknownAlgorithmError
from tests.toy_pruner import ToyPlugin, tiny_cnn


@pytest.fixture
def toy(fresh_plugins):
    fresh_plugins.register(ToyPlugin(), name="toy-plugin")
    return fresh_plugins


X = torch.randn(2, 3, 8, 8)


def test_unknown_algorithm_names_closest_and_available(toy):
    with pytest.raises(UnknownAlgorithmError, match=r"unknown algorithm 'tyo'\. Did you mean 'toy'\? Available: .*toy"):
        mslim.prepare(tiny_cnn(), algo="tyo", example_inputs=X)


def test_misspelt_option_names_field_and_allowed(toy):
    with pytest.raises(ConfigError) as info:
        mslim.prepare(tiny_cnn(), algo="toy", example_inputs=X, scael=2.0)
    message = str(info.value)
    assert "unknown option 'scael' (value 2.0) for algorithm 'toy'; did you mean 'scale'?" in message
    assert "Allowed options: check_equivalence, flops_target, ignored_layers, keep_first, scale." in message


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.2])
def test_flops_target_outside_unit_interval(toy, bad):
    with pytest.raises(ConfigError, match=rf"option 'flops_target' = {bad} is invalid .*allowed: a float > 0.0 and <= 1.0"):
        mslim.prepare(tiny_cnn(), algo="toy", example_inputs=X, flops_target=bad)


def test_wrong_type_names_value(toy):
    with pytest.raises(ConfigError, match=r"option 'scale' = 'big' is invalid for algorithm 'toy': Input should be a valid number"):
        mslim.prepare(tiny_cnn(), algo="toy", example_inputs=X, scale="big")


def test_missing_example_inputs_and_wrong_shape(toy):
    with pytest.raises(ConfigError, match="example_inputs is required"):
        mslim.prepare(tiny_cnn(), algo="toy")
    with pytest.raises(GraphError, match=r"the model failed on example_inputs of shape \(2, 5, 8, 8\)"):
        mslim.prepare(tiny_cnn(), algo="toy", example_inputs=torch.randn(2, 5, 8, 8))


def test_example_check_leaves_modes_and_bn_stats(toy):
    model = tiny_cnn().train()
    model[1].eval()
    stats = model[1].running_mean.clone()
    mslim.prepare(model, algo="toy", example_inputs=X)
    assert model.training and not model[1].training
    assert torch.equal(model[1].running_mean, stats)


def test_ignored_layers_are_checked(toy):
    model = tiny_cnn()
    session = mslim.prepare(model, algo="toy", example_inputs=X, ignored_layers=[model[0], "5"])
    assert session.config.ignored_layers == ["0", "5"]
    nested = torch.nn.Sequential(tiny_cnn())
    with pytest.raises(ConfigError, match=r"ignored_layers names '0\.6', which is not a layer of the model; did you mean '0\.5'\?"):
        mslim.prepare(nested, algo="toy", example_inputs=X, ignored_layers=["0.6"])


def test_recipe_toml_and_json_with_overrides(toy, tmp_path):
    toml = tmp_path / "r.toml"
    toml.write_text('algo = "toy"\nscale = 0.5\nflops_target = 0.3\n')
    session = mslim.prepare(tiny_cnn(), example_inputs=X, recipe=toml, scale=0.25)
    assert session.algorithm == "toy"
    assert (session.config.scale, session.config.flops_target) == (0.25, 0.3)
    js = tmp_path / "r.json"
    js.write_text(json.dumps({"keep_first": 3}))
    assert mslim.prepare(tiny_cnn(), algo="toy", example_inputs=X, recipe=js).config.keep_first == 3


def test_bad_recipes(toy, tmp_path):
    bad = tmp_path / "r.toml"
    bad.write_text('algo = "toy"\nflops_targt = 0.3\n')
    with pytest.raises(ConfigError, match="did you mean 'flops_target'"):
        mslim.prepare(tiny_cnn(), example_inputs=X, recipe=bad)
    broken = tmp_path / "b.toml"
    broken.write_text("scale = = 1")
    with pytest.raises(ConfigError, match=r"is not valid TOML"):
        mslim.prepare(tiny_cnn(), algo="toy", example_inputs=X, recipe=broken)
    yaml = tmp_path / "r.yaml"
    yaml.write_text("scale: 1")
    with pytest.raises(ConfigError, match=r"has suffix '.yaml'; allowed: .toml, .json"):
        mslim.prepare(tiny_cnn(), algo="toy", example_inputs=X, recipe=yaml)
    with pytest.raises(ConfigError, match="does not exist"):
        mslim.prepare(tiny_cnn(), algo="toy", example_inputs=X, recipe=tmp_path / "none.toml")
    with pytest.raises(ConfigError, match="no algorithm given"):
        mslim.prepare(tiny_cnn(), example_inputs=X)


def test_session_lifecycle_and_resume(toy):
    model = tiny_cnn()
    session = mslim.prepare(model, algo="toy", example_inputs=X, scale=0.5)
    assert session.model is model and session.trains
    opt = session.optimizer(lr=0.1)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["decay"]["weight_decay"] == 1e-4 and groups["no_decay"]["weight_decay"] == 0.0
    assert len(groups["no_decay"]["params"]) == 4  # conv bias, BN weight and bias, linear bias
    loss = F.cross_entropy(session.model(X), torch.tensor([0, 1]))
    loss.backward()
    before = model[0].weight.grad.clone()
    session.after_backward()
    torch.testing.assert_close(model[0].weight.grad, before * 0.5)
    opt.step()
    session.step()
    session.step()
    buffer = io.BytesIO()
    torch.save(session.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    other = mslim.prepare(tiny_cnn(), algo="toy", example_inputs=X, scale=0.5)
    other.load_state_dict(state)
    assert other.iteration == 2 and other.pruner.steps_seen == 2
    small, report = other.finalize()
    assert report.extra["steps_seen"] == 2 and report.flops_ratio == 1.0
    with pytest.raises(MslimError, match="already finalized"):
        other.step()


def test_state_of_another_algorithm_is_refused(toy):
    session = mslim.prepare(tiny_cnn(), algo="toy", example_inputs=X)
    with pytest.raises(CheckpointError, match=r"session state is for algorithm 'resrep', this session runs 'toy'"):
        session.load_state_dict({"format": 1, "algorithm": "resrep", "iteration": 0, "pruner": {}})
    with pytest.raises(CheckpointError, match="newer than this mslim understands"):
        session.load_state_dict({"format": 99, "algorithm": "toy", "iteration": 0, "pruner": {}})


def test_training_algorithm_needs_a_loader(toy):
    with pytest.raises(ConfigError, match=r"algorithm 'toy' prunes while training: pass train_loader= and epochs="):
        mslim.prune(tiny_cnn(), algo="toy", example_inputs=X)


def test_cross_option_check_message():
    from pydantic import model_validator

    from mslim_core.config import PrunerConfig, build_config

    class Pair(PrunerConfig):
        low: int = 1
        high: int = 2

        @model_validator(mode="after")
        def ordered(self):
            if self.low > self.high:
                raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
            return self

    with pytest.raises(ConfigError, match=r"the options of algorithm 'pair' do not fit together: .*low \(5\) must not exceed high \(2\)"):
        build_config("pair", Pair, {"low": 5})
