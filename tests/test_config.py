"""Strict configs: unknown keys and wrong types fail naming the key, with a suggestion."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, dataclass, field
from typing import Literal

import pytest
import yaml

from rtdmd.config import ConfigError, apply_overrides, dump_yaml, from_dict, load, packaged_names, to_dict
from rtdmd.train.sample import SampleConfig


@dataclass(frozen=True)
class Inner:
    consistency_weight: float = 0.0
    mode: Literal["ambient", "plain"] = "ambient"
    steps: tuple[int, ...] = (1, 2)


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    count: int = 1
    enabled: bool = True
    aux: Inner | None = None
    inner: Inner = field(default_factory=Inner)
    weights: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        if self.count < 0:
            raise ValueError("count must be >= 0")


def test_unknown_key_names_the_key_and_suggests():
    with pytest.raises(
        ConfigError, match=r"inner\.consistncy_weight: unknown key \(did you mean 'consistency_weight'\?\)"
    ):
        from_dict(Outer, {"inner": {"consistncy_weight": 0.1}})
    with pytest.raises(ConfigError, match=r"^cuont: unknown key \(did you mean 'count'\?\)"):
        from_dict(Outer, {"cuont": 2})


def test_unknown_override_key_names_the_key_and_suggests():
    with pytest.raises(
        ConfigError, match=r"aux\.consistncy_weight: unknown key \(did you mean 'consistency_weight'\?\)"
    ):
        apply_overrides(Outer, {}, ["aux.consistncy_weight=0.01"])


def test_wrongly_typed_override_names_the_key_and_gives_a_valid_example():
    with pytest.raises(ConfigError, match=r"count: expected int, got 'three' \(e\.g\. count=1\)"):
        apply_overrides(Outer, {}, ["count=three"])
    with pytest.raises(
        ConfigError,
        match=r"inner\.mode: expected one of \['ambient', 'plain'\], got 'ambiant' \(did you mean 'ambient'\?\)",
    ):
        apply_overrides(Outer, {}, ["inner.mode=ambiant"])
    with pytest.raises(ConfigError, match=r"enabled: expected bool"):
        apply_overrides(Outer, {}, ["enabled=3"])
    with pytest.raises(ConfigError, match=r"inner\.steps\[1\]: expected int, got 'b'"):
        apply_overrides(Outer, {}, ["inner.steps=[1, b]"])


def test_overrides_are_parsed_by_the_declared_type():
    data = apply_overrides(
        Outer,
        {"name": "a"},
        ["name=123", "count=3", "inner.consistency_weight=1", "aux.mode=plain", "weights={clip: 1, hps: 0.5}"],
    )
    cfg = from_dict(Outer, data)
    assert cfg.name == "123" and isinstance(cfg.name, str)  # a str field keeps the text verbatim
    assert cfg.inner.consistency_weight == 1.0 and isinstance(cfg.inner.consistency_weight, float)
    assert cfg.aux == Inner(mode="plain")
    assert cfg.weights == {"clip": 1.0, "hps": 0.5}
    assert from_dict(Outer, apply_overrides(Outer, {"aux": {}}, ["aux=none"])).aux is None


def test_yaml_values_are_type_checked_and_lists_become_tuples():
    cfg = from_dict(Outer, {"inner": {"steps": [3, 4]}})
    assert cfg.inner.steps == (3, 4)
    with pytest.raises(ConfigError, match=r"count: expected int, got 1.5"):
        from_dict(Outer, {"count": 1.5})
    with pytest.raises(ConfigError, match=r"count: expected int, got True"):
        from_dict(Outer, {"count": True})


def test_validate_runs_after_loading_and_configs_are_frozen():
    with pytest.raises(ConfigError, match="count must be >= 0"):
        from_dict(Outer, {"count": -1})
    cfg = from_dict(Outer, {})
    with pytest.raises(FrozenInstanceError):
        cfg.count = 3  # type: ignore[misc]


def test_round_trip_through_yaml():
    cfg = from_dict(Outer, {"aux": {"steps": [5]}, "weights": {"a": 2.0}})
    assert from_dict(Outer, yaml.safe_load(dump_yaml(cfg))) == cfg
    assert to_dict(cfg)["aux"]["steps"] == [5]


def test_packaged_configs_load_by_name_and_by_path(tmp_path):
    assert "sample/tiny" in packaged_names("sample")
    by_name = load(SampleConfig, "tiny", group="sample")
    assert by_name == load(SampleConfig, "sample/tiny", group="sample")
    path = tmp_path / "mine.yaml"
    path.write_text(dump_yaml(by_name))
    assert load(SampleConfig, str(path), ["sampler.eta=0.0"], group="sample").sampler.eta == 0.0
    with pytest.raises(ConfigError, match=r"no packaged config 'sample/tiyn' \(did you mean 'tiny'\?\)"):
        load(SampleConfig, "tiyn", group="sample")
    with pytest.raises(ConfigError, match="does not exist"):
        load(SampleConfig, str(tmp_path / "missing.yaml"), group="sample")


@pytest.mark.parametrize("name", packaged_names("sample"))
def test_every_shipped_config_validates(name):
    cfg = load(SampleConfig, name, group="sample")
    cfg.sampler.validate()
