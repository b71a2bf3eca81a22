"""OpenAI request parsing, stop strings and response shapes (pure functions)."""

from __future__ import annotations

import json

import pytest

from tether.core.errors import ConfigError
from tether.edge.openai_api import ResponseShape, StopMatcher, parse_request, render_chat, sse


class _Tok:
    chat_template = None


def test_parse_defaults_caps_and_errors():
    req = parse_request({"prompt": "hi", "temperature": 0.7}, False, _Tok(), cap=64)
    assert (req.prompt, req.max_tokens, req.stream, req.stop) == ("hi", 16, False, ())
    assert parse_request({"prompt": ["hi"], "max_tokens": 500}, False, _Tok(), 64).max_tokens == 64
    chat = parse_request({"messages": [{"role": "user", "content": "a"},
                                       {"role": "user", "content": "b"}], "stream": True,
                          "stop": "x", "stream_options": {"include_usage": True}}, True, _Tok(), 32)
    assert (chat.prompt, chat.max_tokens, chat.stop, chat.include_usage) == ("a\nb", 32, ("x",), True)
    for bad, chat_mode in (({"prompt": 3}, False), ({"prompt": "a", "n": 2}, False),
                           ({"prompt": "a", "max_tokens": 0}, False), ({"messages": []}, True),
                           ({"messages": [{"role": "user"}]}, True), ([], False),
                           ({"prompt": "a", "stop": ["", "x"]}, False)):
        with pytest.raises(ConfigError):
            parse_request(bad, chat_mode, _Tok(), 16)


def test_sampling_settings_become_the_edges_generate_request():
    req = parse_request({"prompt": "hi", "temperature": 0.7, "top_p": 0.9, "top_k": 40,
                         "seed": 11, "max_tokens": 5}, False, _Tok(), cap=64)
    msg = req.generate_request(3)
    assert (msg.request_id, msg.prompt, msg.max_new_tokens) == (3, "hi", 5)
    assert (msg.temperature, msg.top_p, msg.top_k, msg.seed) == (0.7, 0.9, 40, 11)
    greedy = parse_request({"prompt": "hi", "temperature": None}, False, _Tok(), 64)
    assert greedy.generate_request().temperature == 0.0       # unlike OpenAI: greedy default
    off = parse_request({"prompt": "hi", "temperature": 0.5, "top_k": -1}, False, _Tok(), 64)
    assert off.generate_request().top_k == 0                  # vLLM's -1: no top-k cut
    for bad in ({"temperature": -1}, {"temperature": "hot"}, {"top_p": 0}, {"top_p": 1.5},
                {"top_k": 2.5}, {"top_k": -2}, {"seed": -3}, {"seed": True}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            parse_request({"prompt": "hi", **bad}, False, _Tok(), 64)


def test_chat_template_used_when_the_tokenizer_has_one():
    class Templated:
        chat_template = "{{...}}"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert tokenize is False and add_generation_prompt is True
            return "<|user|>" + messages[0]["content"] + "<|assistant|>"
    assert render_chat([{"role": "user", "content": "hi"}], Templated()) == \
        "<|user|>hi<|assistant|>"


def test_stop_matcher_cuts_across_token_boundaries():
    m = StopMatcher(("The end",))
    out = [m.feed(t) for t in ("Once ", "upon. Th", "e e", "nd and more")]
    assert "".join(out) == "Once upon. " and m.stopped
    m = StopMatcher(("xyz",))
    assert m.feed("abx") == "ab" and m.feed("q") == "xq" and m.flush() == "" and not m.stopped
    assert StopMatcher(()).feed("anything") == "anything"


def test_response_shapes_and_sse():
    req = parse_request({"messages": [{"role": "user", "content": "a"}]}, True, _Tok(), 8)
    shape = ResponseShape(req, "m")
    first = shape.chunk("Hi", None, first=True, source="cloud")
    assert first["object"] == "chat.completion.chunk" and first["id"].startswith("chatcmpl-")
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Hi"}
    assert first["tether"] == {"source": "cloud"}
    full = shape.full("Hi", "stop", {"prompt_tokens": 1, "completion_tokens": 1,
                                     "total_tokens": 2}, {"cloud": 1})
    assert full["choices"][0]["message"] == {"role": "assistant", "content": "Hi"}
    assert sse("[DONE]") == b"data: [DONE]\n\n"
    assert json.loads(sse(first)[6:]) == first


def test_sampling_settings_are_parsed_and_greedy_is_the_default():
    from tether.core.sampling import SamplingParams
    assert parse_request({"prompt": "hi"}, False, _Tok(), 8).sampling == SamplingParams()
    req = parse_request({"prompt": "hi", "temperature": 0.7, "top_p": 0.9, "seed": 5,
                         "top_k": -1}, False, _Tok(), 8)
    assert req.sampling == SamplingParams(0.7, 0, 0.9, 5)
    nulls = {"prompt": "hi", "temperature": None, "top_p": None, "seed": None}
    assert parse_request(nulls, False, _Tok(), 8).sampling.greedy
    for bad, word in (({"temperature": 2.5}, "temperature"), ({"temperature": -1}, "temperature"),
                      ({"temperature": "hot"}, "temperature"), ({"top_p": 0}, "top_p"),
                      ({"top_k": -3}, "top_k"), ({"seed": "x"}, "seed"), ({"seed": -1}, "seed")):
        with pytest.raises(ConfigError, match=word):
            parse_request({"prompt": "hi", **bad}, False, _Tok(), 8)


def test_a_sampled_answer_tells_its_seed_and_a_greedy_one_does_not():
    unseeded = parse_request({"prompt": "hi", "temperature": 1.0}, False, _Tok(), 8)
    seed = unseeded.sampling.seed
    assert seed is not None
    assert parse_request({"prompt": "hi", "temperature": 1.0}, False, _Tok(), 8).sampling.seed != seed
    shape = ResponseShape(unseeded, "m")
    assert shape.chunk("a", None, first=True, source="cloud")["tether"] == {"source": "cloud",
                                                                            "seed": seed}
    assert shape.chunk("b", None, source="cloud")["tether"] == {"source": "cloud"}
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    assert shape.full("ab", "length", usage, {"cloud": 2})["tether"]["seed"] == seed
    greedy = ResponseShape(parse_request({"prompt": "hi"}, False, _Tok(), 8), "m")
    assert "seed" not in greedy.full("ab", "length", usage, {"cloud": 2})["tether"]
    assert "tether" not in greedy.chunk("a", None, first=True)
