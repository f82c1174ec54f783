import json

import pytest

import vistune
from vistune import SCTunerConfig, TunerConfig, TunerError


def test_config_round_trips_through_json():
    config = SCTunerConfig(down_ratio=0.5, target_skips=[3, 1], scale=0.7)
    text = config.to_json()
    assert json.loads(text)["tuner_type"] == "sc_tuner"
    restored = TunerConfig.from_json(text)
    assert isinstance(restored, SCTunerConfig)
    assert restored == config
    assert restored.target_skips == [1, 3]  # normalised
    assert SCTunerConfig.from_dict(config.to_dict()) == config


def test_registry_knows_sc_tuner():
    entry = vistune.registered_tuners()["sc_tuner"]
    assert entry.config_class is SCTunerConfig and entry.tuner_class is vistune.SCTuner


@pytest.mark.parametrize(
    "data, message",
    [
        ({"tuner_type": "nope"}, "unknown tuner type 'nope'"),
        ({"tuner_type": "sc_tuner", "ratio": 2}, "unknown field"),
        ({"down_ratio": 1.0}, "no 'tuner_type'"),
    ],
)
def test_bad_config_dicts_are_rejected_clearly(data, message):
    with pytest.raises(TunerError, match=message):
        TunerConfig.from_dict(data)


def test_bad_values_are_rejected():
    with pytest.raises(TunerError, match="down_ratio"):
        SCTunerConfig(down_ratio=0)
    with pytest.raises(TunerError, match="target_skips"):
        SCTunerConfig(target_skips=[1, 1])
    with pytest.raises(TunerError, match="no hidden units"):
        SCTunerConfig(down_ratio=0.001).hidden_width(320)
    with pytest.raises(TunerError, match="not valid JSON"):
        TunerConfig.from_json("{")
