"""Scenario TOML schema, arrival processes and image sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tether.core.errors import ConfigError
from tether.testbed.load import arrival_times, load_images
from tether.testbed.scenario import Scenario, load_scenario

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_scenarios_validate(path):
    scenario = load_scenario(path)
    assert scenario.policies and scenario.duration_s > 0


def test_unknown_key_names_the_key(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('duration_s = 3\n[link]\nup = "constant:5"\ndelay = 10\n')
    with pytest.raises(ConfigError, match="link.delay"):
        load_scenario(path)


def test_policy_labels_must_be_unique():
    with pytest.raises(ConfigError, match="unique"):
        Scenario(policies=({"name": "adaptive"}, {"name": "adaptive"}))
    ok = Scenario(policies=({"name": "adaptive"}, {"name": "adaptive", "label": "ad-ewma",
                                                   "estimator": "ewma"}))
    assert ok.policy_labels == ["adaptive", "ad-ewma"]


@pytest.mark.parametrize("kwargs", [{"edges": 0}, {"arrival": "bursty"}, {"rate_hz": 0},
                                    {"cpu_quota": 0.0}, {"images": "imagenet"}, {"policies": ()}])
def test_bad_scenarios_are_rejected(kwargs):
    with pytest.raises(ConfigError):
        Scenario(**kwargs)


def test_relative_trace_paths_resolve_next_to_the_toml(tmp_path):
    (tmp_path / "my.up").write_text("1\n2\n3\n")
    path = tmp_path / "s.toml"
    path.write_text('[link]\nup = "my.up"\ndown = "constant:10"\n')
    scenario = load_scenario(path)
    assert scenario.link.up == str(tmp_path / "my.up")
    assert scenario.link.down == "constant:10"


def test_poisson_arrivals_are_seeded_and_have_the_rate():
    a = arrival_times("poisson", 20.0, 50.0, seed=4)
    assert np.array_equal(a, arrival_times("poisson", 20.0, 50.0, seed=4))
    assert not np.array_equal(a, arrival_times("poisson", 20.0, 50.0, seed=5))
    assert a[0] == 0.0 and np.all(np.diff(a) > 0) and a[-1] < 50.0
    assert 900 < a.size < 1100


def test_periodic_arrivals():
    a = arrival_times("periodic", 4.0, 2.0, seed=0)
    assert np.allclose(a, [0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75])


def test_random_images_match_the_bundle_input_and_picks_cycle():
    images = load_images("random", (1, 3, 32, 32), seed=1, assets=None)
    assert images.images.shape[1:] == (32, 32, 3) and images.images.dtype == np.uint8
    assert (images.labels == -1).all()
    picks = images.pick(150, seed=2)
    assert len(picks) == 150 and set(picks[:64]) == set(range(64))


def test_cifar_images_need_assets():
    with pytest.raises(ConfigError, match="--assets"):
        load_images("cifar10", (1, 3, 32, 32), seed=1, assets=None)


def test_cifar_images_from_assets(assets):
    images = load_images("cifar10", (1, 3, 32, 32), seed=1, assets=assets)
    assert images.images.shape == (1017, 32, 32, 3)
    assert set(np.unique(images.labels)) == set(range(10))


def _demo_args(**kw):
    import argparse

    from tether.commands import demo
    parser = argparse.ArgumentParser()
    demo.add_parsers(parser.add_subparsers())
    argv = ["demo"] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    return parser.parse_args(argv), demo


def test_demo_scenario_is_a_weak_edge_on_a_userspace_link():
    args, demo = _demo_args(duration=60, rate=2)
    scenario = demo.demo_scenario(args)
    assert scenario.weights is None and scenario.duration_s == 10 and scenario.rate_hz == 2
    # the quota is set at run time from this machine's speed (tether.testbed.demo.weak_edge_quota)
    assert scenario.cpu_quota is None and scenario.link.backend == "userspace"
    assert demo.demo_scenario(_demo_args(cpu_quota=0.2)[0]).cpu_quota == 0.2
    with pytest.raises(ConfigError):
        demo.demo_scenario(_demo_args(rate=0)[0])
    with pytest.raises(ConfigError):
        demo.demo_scenario(_demo_args(cpu_quota=0)[0])


def test_oracle_cannot_run_live():
    with pytest.raises(ConfigError, match="oracle"):
        Scenario(policies=({"name": "oracle"},))
