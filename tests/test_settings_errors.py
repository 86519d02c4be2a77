"""Settings precedence and the exception tree's contract."""

from __future__ import annotations

import pickle

import pytest

from neuron.errors import ConfigError, DecodeError, InputError, RejectedImage, SkippedInput, WeightsError
from neuron.settings import Settings, WeightsMode


def test_flags_win_over_environment_which_wins_over_defaults(tmp_path):
    env = {"NEURON_DEVICE": "cpu", "NEURON_WEIGHTS": "untrained", "NEURON_BATCH_SIZE": "7",
           "NEURON_OUT": str(tmp_path)}
    s = Settings.from_env(env, batch_size=3)
    assert (s.device, s.weights, s.batch_size, s.out_dir) == ("cpu", WeightsMode.UNTRAINED, 3, tmp_path)
    assert s.resolved_database_url == f"sqlite:///{(tmp_path / 'neuron.db').resolve()}"
    assert Settings.from_env({}).weights is WeightsMode.PRETRAINED


@pytest.mark.parametrize(("env", "match"), [
    ({"NEURON_BATCH_SIZE": "many"}, "NEURON_BATCH_SIZE='many' is not a whole number"),
    ({"NEURON_WEIGHTS": "imagenet"}, "'pretrained' or 'untrained'"),
    ({"NEURON_DEVICE": "tpu"}, "device 'tpu' is not one of"),
    ({"NEURON_ALLOW_DOWNLOAD": "maybe"}, "not a boolean"),
    ({"NEURON_READERS": "0"}, "readers 0 must be at least 1"),
])
def test_bad_settings_name_the_value_and_the_rule(env, match):
    with pytest.raises(ConfigError, match=match):
        Settings.from_env(env)


@pytest.mark.parametrize("exc", [DecodeError("bad pixels"), SkippedInput("CT"), RejectedImage("colour"),
                                 WeightsError("missing")])
def test_errors_pickle_for_transport_between_processes(exc):
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc) and str(back) == str(exc)
    if isinstance(exc, InputError):
        assert back.status == exc.status and back.reason == str(exc)
