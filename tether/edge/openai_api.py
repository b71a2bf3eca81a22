"""OpenAI-compatible request parsing and response shapes for the edge's HTTP front.

What the split LLM honours: ``prompt``/``messages``, ``max_tokens`` (or
``max_completion_tokens``), ``stream``, ``stop``, ``n = 1``, and sampling: ``temperature``
(0..2), ``top_p``, ``seed`` and vLLM's ``top_k`` extension (-1 or 0: off), which become the
edge's :class:`tether.core.protocol.Generate` request. Unlike OpenAI, an omitted
``temperature`` means greedy (exactly the whole model's argmax); a ``seed`` makes a sampled
answer reproducible and equal to the whole model's under the same settings; a sampled answer
tells its seed (``"tether": {"seed": ...}``, in the first chunk when streaming) so an unseeded
one can be replayed (documented in docs/runtime.md). Pure functions, no IO.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from tether.core import protocol as P
from tether.core.errors import ConfigError
from tether.core.sampling import SamplingParams

DEFAULT_MAX_TOKENS = 16        # OpenAI's default for /v1/completions


@dataclass(frozen=True)
class CompletionRequest:
    """One parsed /v1/completions or /v1/chat/completions request."""

    model: str
    prompt: str
    max_tokens: int
    stream: bool
    stop: tuple[str, ...]
    chat: bool
    include_usage: bool = False
    sampling: SamplingParams = SamplingParams()

    def generate_request(self, request_id: int = 0) -> P.Generate:
        """The edge's declared generation request for this completion."""
        s = self.sampling
        return P.Generate(request_id, self.prompt, (), self.max_tokens, s.temperature,
                          s.top_k, s.top_p, s.seed)


def parse_request(body: Any, chat: bool, tokenizer: Any, cap: int) -> CompletionRequest:
    """Validate the JSON body (raises ConfigError with the field at fault)."""
    if not isinstance(body, dict):
        raise ConfigError("the request body must be a JSON object")
    if chat:
        prompt = render_chat(body.get("messages"), tokenizer)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ConfigError("'prompt' must be a string (one prompt per request)")
    n = body.get("n", 1)
    if n != 1:
        raise ConfigError(f"'n' must be 1 (one answer per request), got {n!r}")
    default = DEFAULT_MAX_TOKENS if not chat else cap
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    limit = default if limit is None else limit
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ConfigError(f"'max_tokens' must be a positive integer, got {limit!r}")
    stop = body.get("stop") or ()
    if not isinstance(stop, (str, list, tuple)):
        raise ConfigError("'stop' must be a string or up to 4 non-empty strings")
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise ConfigError("'stop' must be a string or up to 4 non-empty strings")
    options = body.get("stream_options") or {}
    return CompletionRequest(str(body.get("model") or ""), prompt, min(limit, cap),
                             bool(body.get("stream", False)), stop, chat,
                             bool(isinstance(options, dict) and options.get("include_usage")),
                             parse_sampling(body))


def parse_sampling(body: dict[str, Any]) -> SamplingParams:
    """``temperature`` (0..2, omitted: greedy), ``top_p``, ``top_k`` and ``seed`` of a request."""
    given = {key: body[key] for key in ("temperature", "top_k", "top_p", "seed")
             if body.get(key) is not None}
    temperature = given.get("temperature", 0.0)
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) \
            and temperature > 2:
        raise ConfigError(f"'temperature' must be in [0, 2], got {temperature!r}")
    if given.get("top_k") == -1:            # vLLM's spelling of "off"
        given["top_k"] = 0
    try:
        return SamplingParams(**given).resolved()   # unseeded: a fresh seed, told in the answer
    except ConfigError as exc:
        raise ConfigError(f"invalid sampling settings: {exc}") from exc


def render_chat(messages: Any, tokenizer: Any) -> str:
    """The prompt for a chat: the tokenizer's chat template when it has one, else the
    messages' text one per line (base models such as stories260K have no template)."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError("'messages' must be a non-empty list of {role, content} objects")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ConfigError("each message needs a string 'content' (text only)")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)


class StopMatcher:
    """Cuts the stream at the first stop string, holding back text that may start one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text safe to emit now."""
        if not self.stops:
            return text
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._held = True, ""
            return buf[:cut]
        keep = max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])),
                   default=0)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out


class ResponseShape:
    """Builds the OpenAI JSON objects for one request (ids, timestamps, chunk shapes)."""

    def __init__(self, req: CompletionRequest, model: str) -> None:
        self.req, self.model = req, model
        prefix = "chatcmpl" if req.chat else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, text: str | None, finish: str | None, first: bool = False,
              source: str | None = None) -> dict[str, Any]:
        """One streamed chunk (``text`` None with ``finish``: the closing chunk)."""
        if self.req.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            out = self._base("chat.completion.chunk") | {"choices": [choice]}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            out = self._base("text_completion") | {"choices": [choice]}
        extra: dict[str, Any] = {"source": source} if source is not None else {}
        if first and not self.req.sampling.greedy:
            extra["seed"] = self.req.sampling.seed
        if extra:
            out["tether"] = extra
        return out

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        name = "chat.completion.chunk" if self.req.chat else "text_completion"
        return self._base(name) | {"choices": [], "usage": usage}

    def full(self, text: str, finish: str, usage: dict[str, int],
             sources: dict[str, int]) -> dict[str, Any]:
        """The non-streaming answer."""
        if self.req.chat:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish,
                                      "message": {"role": "assistant", "content": text}}
            out = self._base("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            out = self._base("text_completion")
        extra: dict[str, Any] = {"sources": sources}
        if not self.req.sampling.greedy:
            extra["seed"] = self.req.sampling.seed      # replays this answer
        return out | {"choices": [choice], "usage": usage, "tether": extra}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event carrying JSON (or the literal ``[DONE]``)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def error_body(message: str, code: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "code": code, "param": None}}
