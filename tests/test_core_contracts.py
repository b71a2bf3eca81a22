"""Core contracts: config loading, shared types, bundle manifest, error tree."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tether.core import errors
from tether.core.bundle import CodecEntry, ExitEntry, Manifest, SplitEntry
from tether.core.config import from_mapping, load_config, with_overrides
from tether.core.policy import DecisionContext, FixedPolicy, Policy
from tether.core.types import Action, ActionKind, CostTable, SplitCost, TensorSpec


@dataclasses.dataclass(frozen=True)
class Inner:
    rate: float = 1.0
    names: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Outer:
    port: int
    host: str = "127.0.0.1"
    debug: bool = False
    timeout: float | None = None
    kind: ActionKind = ActionKind.LOCAL
    inner: Inner = dataclasses.field(default_factory=Inner)

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise errors.ConfigError(f"port must be in 1..65535, got {self.port}")


def test_config_builds_nested_frozen_dataclass(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text('port = 5555\nkind = "split"\n[inner]\nrate = 2\nnames = ["a", "b"]\n')
    cfg = load_config(Outer, path)
    assert cfg == Outer(port=5555, kind=ActionKind.SPLIT, inner=Inner(2.0, ("a", "b")))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.port = 1  # type: ignore[misc]


@pytest.mark.parametrize("data, fragment", [
    ({"port": 1, "prot": 2}, "unknown config key 'prot'"),
    ({"port": "x"}, "port: expected int"),
    ({"port": 1, "inner": {"rate": "fast"}}, "inner.rate: expected float"),
    ({"port": 1, "inner": {"names": [1]}}, "inner.names[0]: expected str"),
    ({"port": 1, "kind": "teleport"}, "kind: 'teleport' is not one of"),
    ({"port": 70000}, "port must be in 1..65535"),
    ({"port": True}, "port: expected int"),
])
def test_config_errors_name_the_bad_key(data, fragment):
    with pytest.raises(errors.ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        from_mapping(Outer, data)


def test_config_file_errors(tmp_path: Path):
    with pytest.raises(errors.ConfigError, match="not found"):
        load_config(Outer, tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("port = = 3")
    with pytest.raises(errors.ConfigError, match="not valid TOML"):
        load_config(Outer, bad)


def test_overrides_win_and_are_validated():
    cfg = Outer(port=1)
    assert with_overrides(cfg, port=9, host=None).port == 9
    with pytest.raises(errors.ConfigError):
        with_overrides(cfg, port="nine")
    with pytest.raises(errors.ConfigError):
        with_overrides(cfg, nope=1)


def test_action_keys_round_trip():
    for action in [Action(ActionKind.LOCAL), Action(ActionKind.OFFLOAD, codec="webp75"),
                   Action(ActionKind.SPLIT, "layer2.1", "int8"), Action(ActionKind.EXIT, "layer1")]:
        assert Action.parse(action.key) == action
    with pytest.raises(ValueError):
        Action(ActionKind.SPLIT)


def test_tensor_spec_validates():
    assert TensorSpec((1, 16, 32, 32)).nbytes == 65536
    assert TensorSpec((2, 3), "float16").nbytes == 12
    with pytest.raises(ValueError):
        TensorSpec((1,), "complex64")
    with pytest.raises(ValueError):
        TensorSpec((-1, 3))


def test_cost_table_json_round_trip(tmp_path: Path):
    table = CostTable("m", TensorSpec((1, 3, 32, 32)), 0.01, 0.001,
                      (SplitCost("layer1", 3, (1, 16, 32, 32), "float32", 65536, 0.002, 0.003),))
    table.save(tmp_path / "costs.json")
    assert CostTable.load(tmp_path / "costs.json") == table
    assert table.split("layer1").bytes == 65536
    with pytest.raises(errors.SplitError, match="valid"):
        table.split("layer9")
    (tmp_path / "bad.json").write_text(json.dumps({"model_id": "m"}))
    with pytest.raises(errors.BundleError):
        CostTable.load(tmp_path / "bad.json")


def test_manifest_round_trip_and_validation(tmp_path: Path):
    manifest = Manifest("m", "abc", TensorSpec((1, 3, 32, 32)),
                        (SplitEntry("layer1", 3, (1, 16, 32, 32), "float32", 65536, "heads/layer1.onnx"),))
    manifest = manifest.with_codec(CodecEntry("layer1", "int8", "int8"))
    manifest = manifest.with_codec(CodecEntry("layer1", "int8", "int8", {"x": 1}))
    manifest = manifest.with_exit(ExitEntry("layer1", "exits/layer1.onnx", 0.9))
    manifest.save(tmp_path)
    loaded = Manifest.load(tmp_path)
    assert loaded == manifest and len(loaded.codecs) == 1 and loaded.codecs[0].params == {"x": 1}
    with pytest.raises(errors.SplitError, match="layer1"):
        loaded.split("nope")
    with pytest.raises(errors.BundleError, match="tether partition"):
        Manifest.load(tmp_path / "empty")
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(errors.BundleError, match="version 99"):
        Manifest.load(tmp_path)


def test_error_codes_round_trip():
    for code, cls in errors.ERROR_CLASSES.items():
        rebuilt = errors.error_from_code(code, "msg")
        assert type(rebuilt) is cls and str(rebuilt) == "msg"
        assert issubclass(cls, errors.TetherError)
    unknown = errors.error_from_code("martian", "hi")
    assert isinstance(unknown, errors.RemoteError) and "martian" in str(unknown)


def test_fixed_policy_satisfies_interface():
    policy = FixedPolicy(Action(ActionKind.SPLIT, "layer1"))
    assert isinstance(policy, Policy)
    assert policy.decide(DecisionContext(now=0.0)).split == "layer1"
