"""Trained early exits: better than the raw exit, calibrated, saved and loaded safely."""

from __future__ import annotations

import pytest
import torch

from tether.core.errors import ConfigError, WeightsError
from tether.partitioner.llm import (EdgeLM, calibrate_threshold, encode_texts, exit_curve,
                                    load_exit_head, save_exit_head, split_llm, train_exit_head)


@pytest.mark.slow
def test_trained_exit_beats_raw_exit_and_round_trips(stories, stories_texts, exit_training_tokens,
                                                     tmp_path):
    test = encode_texts(stories.tokenizer(), stories_texts)
    edge, cloud = split_llm(stories, 3)
    raw = exit_curve(edge, cloud, test, [0.8])[0]
    head = train_exit_head(edge, cloud, exit_training_tokens, steps=80)
    edge.exit_head = head
    trained = exit_curve(edge, cloud, test, [0.8])[0]
    assert raw.agreement < 0.3 < trained.agreement          # raw exit mostly copies its input
    assert trained.overall_agreement > raw.overall_agreement
    save_exit_head(head, tmp_path / "exit.pt")
    again = EdgeLM(stories, 3)
    again.exit_head = load_exit_head(again, tmp_path / "exit.pt")
    h = edge(torch.tensor([test[0][:20]]))
    torch.testing.assert_close(again.exit_logits(h), edge.exit_logits(h))
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(WeightsError):
        load_exit_head(again, tmp_path / "bad.pt")


def test_calibration_picks_the_lowest_threshold_meeting_the_target(stories, stories_texts):
    test = encode_texts(stories.tokenizer(), stories_texts[:2])
    edge, cloud = split_llm(stories, 4)
    points = exit_curve(edge, cloud, test, [0.3, 0.5, 0.7, 0.9, 0.99])
    rates = [p.exit_rate for p in points]
    assert rates == sorted(rates, reverse=True) and 0 < rates[0] <= 1
    chosen = calibrate_threshold(points, 0.9)
    assert chosen.agreement >= 0.9
    assert all(p.agreement < 0.9 or p.threshold >= chosen.threshold for p in points if p.exit_rate)
    assert calibrate_threshold(points, 1.0).threshold in (float("inf"), 0.99, 0.9)
    with pytest.raises(ConfigError):
        calibrate_threshold(points, 0.0)
