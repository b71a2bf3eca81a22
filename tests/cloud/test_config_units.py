"""Cloud config: `_seconds` spellings (the edge's style) beside the old `_s` ones; defaults that
hold up under load."""

from __future__ import annotations

import pytest

from tether.cloud.config import CloudConfig, load_cloud_config
from tether.core.errors import ConfigError


def test_seconds_spellings_set_the_same_fields(tmp_path):
    path = tmp_path / "cloud.toml"
    path.write_text("[cloud]\nmax_queue_delay_seconds = 0.004\ndrain_timeout_seconds = 3.0\n"
                    "inline_compute_seconds = 0.0\n")
    config = load_cloud_config(path)
    assert (config.max_queue_delay_s, config.drain_timeout_s, config.inline_compute_s) == \
        (0.004, 3.0, 0.0)
    path.write_text("max_queue_delay_s = 0.002\n")            # old names keep working
    assert load_cloud_config(path).max_queue_delay_s == 0.002


def test_both_spellings_at_once_are_refused(tmp_path):
    path = tmp_path / "cloud.toml"
    path.write_text("[cloud]\nmax_queue_delay_seconds = 0.004\nmax_queue_delay_s = 0.002\n")
    with pytest.raises(ConfigError, match="keep only max_queue_delay_seconds"):
        load_cloud_config(path)


def test_example_config_loads_and_defaults_use_one_torch_thread():
    from pathlib import Path
    example = Path(__file__).resolve().parents[2] / "configs" / "cloud.example.toml"
    assert load_cloud_config(example).torch_threads == 1
    assert CloudConfig().torch_threads == 1
