"""LLM generation on the edge: layers ``[0, k)`` here, ``[k, L)`` in the cloud, early exit, fallback.

:class:`LLMEdge` runs the edge part of a split LLM with its own KV cache per session and
streams tokens as they come (``async for event in edge.generate("prompt")``). Per token:

* the edge computes the hidden state at layer ``k`` and, when it has the exit head, the
  CE-CoLLM early exit (final norm + LM head at layer ``k``); if its max probability reaches
  ``exit_threshold`` the token is emitted locally (``source="exit"``) and its hidden state is
  kept pending;
* otherwise one DECODE carries every pending hidden state (the skipped ones, batched, then
  the current one) so the cloud's KV cache stays exactly consistent, and the cloud's
  token is emitted (``source="cloud"``);
* every token, wherever it is chosen, comes from :func:`~tether.partitioner.llm.choose_token`
  under the stream's :class:`~tether.partitioner.llm.SamplingParams` (greedy by default;
  the PREFILL carries them to the cloud; a seeded draw depends only on the seed and the
  token's position, so seeded streams repeat the whole model's tokens);
* an unknown/expired/out-of-step session (SessionError) is re-prefilled from the edge's
  stored hidden states (also when more than ``max_catchup_tokens`` are pending);
* when the cloud is unreachable, slow, busy or answers another ERROR, a *trained* exit head
  (``part.exit_head``) answers (``source="local"``) and the cloud is retried after
  ``retry_after_s`` (BUSY backs off only the refused stream; a lost or failing cloud, every
  stream). Without a trained exit head the stream ends with the typed error
  (PeerUnavailableError, DeadlineExceededError, BusyError, or the cloud's own): the raw final
  norm + LM head applied to layer-``k`` states is never passed off as the model's output;
* before its first step the edge waits for the link's handshake, and the first step may
  take ``first_step_timeout_s`` (a cold cloud builds its part of the model lazily).

The session steps travel on the edge's :class:`~tether.edge.link.CloudLink` (ZeroMQ, or the
in-process twin in tests): the same handshake, heartbeats, reconnects, CURVE and typed
errors as the image path, and one socket when one daemon serves both. Every finished (or
failed) stream leaves a :class:`GenerationRecord` in ``LLMEdge.records`` (tokens by source,
the switches between cloud and edge). Applications stream tokens from the edge's application
endpoint (:class:`tether.edge.server.EdgeServer`, client :class:`tether.edge.client.EdgeClient`),
which serves this class.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import torch

from tether.core import protocol as P
from tether.codecs import hidden_codec
from tether.core.errors import (BusyError, ConfigError, PeerUnavailableError, ProtocolError,
                                SessionError, TetherError, TransientError)
from tether.edge.client import SOURCES
from tether.edge.link import CloudLink
from tether.partitioner.llm import EdgeLM, SamplingParams, choose_token, split_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateConfig:
    """How the edge generates: codec on the wire, exit threshold, timeouts."""

    codec: str = "fp16"
    exit_threshold: float | None = None   # None: never exit early while the cloud answers
    timeout_s: float = 2.0                # per cloud step
    first_step_timeout_s: float = 30.0    # readiness + first PREFILL (covers a cold cloud)
    retry_after_s: float = 1.0            # stay on the edge this long after a cloud failure
    max_catchup_tokens: int = 256         # more pending hidden states: re-prefill instead

    def __post_init__(self) -> None:
        object.__setattr__(self, "codec", hidden_codec(self.codec).codec_id)   # current name
        if self.exit_threshold is not None and not 0.0 <= self.exit_threshold <= 1.0:
            raise ConfigError(f"exit_threshold must be in [0, 1], got {self.exit_threshold}")
        if self.timeout_s <= 0 or self.retry_after_s < 0 or self.max_catchup_tokens < 1:
            raise ConfigError("timeout_s must be > 0, retry_after_s >= 0, max_catchup_tokens >= 1")
        if self.first_step_timeout_s <= 0:
            raise ConfigError(f"first_step_timeout_s must be > 0, got {self.first_step_timeout_s}")

    @property
    def first_timeout_s(self) -> float:
        """Budget of a PREFILL (and of the readiness wait without exit head): never below a step's."""
        return max(self.first_step_timeout_s, self.timeout_s)


@dataclass(frozen=True)
class TokenEvent:
    """One generated token as the application sees it."""

    token: int
    text: str                  # new text this token completes (may be "" mid UTF-8 sequence)
    source: str                # "cloud", "exit" (confident edge) or "local" (cloud unreachable)
    seconds: float             # edge wall time for this token
    bytes_sent: int = 0
    bytes_received: int = 0
    reprefilled: bool = False  # the cloud session was rebuilt for this token


@dataclass
class GenerationRecord:
    """One stream's outcome: tokens by source, the switches between cloud and edge, and the
    error that ended it, if any.

    ``switches``: ``(token index, source it switched to, why)`` each time the answering side
    changed between the cloud and the edge's fallback (``"local"``, why = the cloud's error
    code) and back (``"cloud"``, why = ``""``); confident early exits are not switches.
    """

    session_id: str
    tokens: int = 0
    cloud: int = 0
    exit: int = 0
    local: int = 0              # answered by the exit head because the cloud failed
    error: str = ""             # error code that ended the stream ("" = completed)
    seconds: float = 0.0
    switches: list[tuple[int, str, str]] = field(default_factory=list)
    seed: int | None = None     # the sampling seed (None: greedy), to replay the stream

    def count(self, source: str, why: str = "") -> None:
        if source != "exit":
            last = next((s for _, s, _ in reversed(self.switches)), None)
            previous = last or ("cloud" if self.cloud else "local" if self.local else None)
            if previous is not None and previous != source:
                self.switches.append((self.tokens, source, why if source == "local" else ""))
        self.tokens += 1
        setattr(self, source, getattr(self, source) + 1)

    def by_source(self) -> dict[str, int]:
        return {s: getattr(self, s) for s in SOURCES}


@dataclass
class _Session:
    id: str
    cache: Any
    tokens: list[int]
    hidden: list[torch.Tensor] = field(default_factory=list)   # [T_i, D] per edge step
    length: int = 0            # tokens the edge has processed
    cloud_length: int = 0      # tokens the cloud session holds
    prompt_length: int = 0
    retry_at: float = 0.0      # the cloud refused this stream (BUSY): not before this time
    failure: str = ""          # code of the cloud's last failure for this stream
    sampling: SamplingParams = SamplingParams()

    def pending(self) -> torch.Tensor:
        """Hidden states the cloud has not seen (only the tail segments are copied)."""
        out, n = [], self.length - self.cloud_length
        for h in reversed(self.hidden):
            if n <= 0:
                break
            out.append(h[-n:] if len(h) > n else h)
            n -= len(h)
        return torch.cat(out[::-1])


class LLMEdge:
    """The edge half of a split LLM; one instance serves many sequential or concurrent sessions."""

    def __init__(self, part: EdgeLM, fingerprint: str, tokenizer: Any,
                 config: GenerateConfig = GenerateConfig(), link: CloudLink | None = None,
                 model_id: str = "llm") -> None:
        self.part, self.fingerprint, self.tokenizer = part, fingerprint, tokenizer
        self.config, self.model_id = config, model_id
        self.codec = hidden_codec(config.codec)
        self.split = split_name(part.k)
        if config.exit_threshold is not None and not self.has_exit:
            raise ConfigError(f"exit_threshold needs a trained exit head at split {part.k} "
                              "(`tether llm-exit`, then --exit-head): the raw final norm + LM "
                              "head at an inner layer is not the model's answer")
        self.records: deque[GenerationRecord] = deque(maxlen=1024)   # newest last
        self._down_until = 0.0
        self._link_started = False
        self._seen_ready = False   # the link completed a handshake once
        self._ready_wait: asyncio.Future | None = None    # the streams' shared handshake wait
        self._lock = asyncio.Lock()
        self.metrics: Any = None        # tether.core.metrics.LLMMetrics, set by the daemon
        self.link: CloudLink | None = None
        if link is not None:
            self.attach(link)

    def attach(self, link: CloudLink) -> None:
        """Use ``link`` for the session steps (its handshake also names this LLM's weights)."""
        link.add_bundle(self.bundle_info())
        self.link = link

    def bundle_info(self) -> P.BundleInfo:
        """What the handshake asks the cloud to serve: these weights (by fingerprint)."""
        return P.BundleInfo(self.model_id, self.fingerprint, (self.split,), (self.config.codec,))

    @property
    def has_exit(self) -> bool:
        """The edge may answer alone: a trained exit head, or the whole model is here."""
        return self.part.lm_head is not None and (
            self.part.exit_head is not None or self.part.k >= self.part.n_layers)

    @property
    def cloud_available(self) -> bool:
        return (self.link is not None and self.link.ready
                and time.monotonic() >= self._down_until)

    async def generate(self, prompt: str | list[int], max_new_tokens: int = 64,
                       stop_at_eos: bool = True, *,
                       sampling: SamplingParams | None = None) -> AsyncIterator[TokenEvent]:
        """Stream the continuation of ``prompt`` token by token: greedy, or sampled under
        ``sampling`` (seed None: a fresh one, kept in the record).

        Raises the typed cloud error (ending the stream) when the cloud fails and the edge
        cannot answer alone; :attr:`records` gets the stream's :class:`GenerationRecord`.
        """
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ConfigError("empty prompt: pass text or at least one token id (BOS)")
        s = _Session(uuid.uuid4().hex[:16], self.part.new_cache(), list(ids),
                     prompt_length=len(ids), sampling=(sampling or SamplingParams()).resolved())
        record, started = GenerationRecord(s.id, seed=s.sampling.seed), time.perf_counter()
        detok = _Detokenizer(self.tokenizer, ids[-1])
        step_ids, ok = ids, False
        if self.metrics is not None:
            self.metrics.stream_started()
        try:
            for i in range(max_new_tokens):
                t0 = time.perf_counter()
                h_last = await self._edge_step(s, step_ids)
                token, source, sent, received, re = await self._next_token(s, h_last)
                s.tokens.append(token)
                step_ids = [token]
                record.count(source, s.failure)
                now = time.perf_counter()
                if self.metrics is not None:
                    self.metrics.observe_token(source, now - t0, now - started, i == 0)
                yield TokenEvent(token, detok.feed(token), source, now - t0, sent, received, re)
                if stop_at_eos and token == getattr(self.tokenizer, "eos_id", None):
                    break
            ok = True
        except TetherError as exc:
            record.error = exc.code
            raise
        finally:
            if self.metrics is not None:
                self.metrics.stream_finished(ok)
            record.seconds = time.perf_counter() - started
            self.records.append(record)
            if record.local:
                log.warning("session %s: %d of %d tokens answered by the exit head while the "
                            "cloud was unavailable (switches: %s)", s.id, record.local,
                            record.tokens, record.switches)
            await self._close_session(s)

    async def _compute(self, fn: Any, *args: Any) -> Any:
        async with self._lock:          # one edge forward pass at a time, off the event loop
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def _edge_step(self, s: _Session, ids: list[int]) -> torch.Tensor:
        """Layers [0, k) over ``ids``; returns the last position's hidden state ``[1, D]``."""
        h = await self._compute(lambda: self.part(torch.tensor([ids]), s.cache, s.length)[0])
        s.hidden.append(h)
        s.length += len(ids)
        return h[-1:]

    async def _next_token(self, s: _Session, h_last: torch.Tensor):
        threshold = self.config.exit_threshold
        logits = None
        if self.has_exit and threshold is not None:   # the exit runs only when it may answer
            logits = (await self._compute(self.part.exit_logits, h_last))[0]
            if float(logits.softmax(-1).max()) >= threshold:
                return self._choose(s, logits), "exit", 0, 0, False
        failure: TetherError | None = None
        now = time.monotonic()
        if self.link is not None and now >= self._down_until and now >= s.retry_at:
            try:
                return await self._cloud_token(s)
            except TetherError as exc:      # unreachable, busy, slow or refusing
                failure = exc
                self._cloud_failed(s, exc)
        if not self.has_exit:
            raise self._no_local_answer(s, failure)
        if logits is None:
            logits = (await self._compute(self.part.exit_logits, h_last))[0]
        return self._choose(s, logits), "local", 0, 0, False

    @staticmethod
    def _choose(s: _Session, logits: torch.Tensor) -> int:
        """The edge's token for position ``s.length``: the same draw the cloud would make."""
        return choose_token(logits, s.sampling, s.length)[0]

    def _cloud_failed(self, s: _Session, exc: TetherError) -> None:
        """BUSY backs off this stream only (for the cloud's own estimate when it is longer);
        anything else the cloud for every stream."""
        s.failure = exc.code
        until = time.monotonic() + self.config.retry_after_s
        if isinstance(exc, BusyError):
            s.retry_at = max(until, time.monotonic() + exc.retry_after_s)
            return
        self._down_until = until
        if not isinstance(exc, TransientError):
            log.warning("cloud %s refused session %s: %s", self._where(), s.id, exc)

    def _where(self) -> str:
        return getattr(self.link, "endpoint", "?") if self.link is not None else "none configured"

    def _no_local_answer(self, s: _Session, failure: TetherError | None) -> TetherError:
        """The typed error that ends a stream the edge cannot continue alone."""
        where = self._where()
        why = (f"cloud ({where}) failed at token {len(s.tokens) - s.prompt_length + 1}: "
               f"{failure}" if failure is not None else
               f"cloud ({where}) unavailable (it failed less than {self.config.retry_after_s} s ago)"
               if self.link is not None else "no cloud configured")
        text = (f"{why}; this edge part (split {self.split}) has no trained exit head to "
                "continue alone, so generation stops here (train one with `tether llm-exit`)")
        if failure is not None and not isinstance(failure, TransientError):
            return type(failure)(text)
        cls = type(failure) if failure is not None else PeerUnavailableError
        return cls(text)

    async def _cloud_token(self, s: _Session):
        await self._wait_ready()
        try:
            token, sent, received = await self._cloud_step(s)
            return token, "cloud", sent, received, False
        except SessionError:            # unknown, expired or out of step: rebuild it once
            s.cloud_length = 0
            token, sent, received = await self._cloud_step(s)
            return token, "cloud", sent, received, True

    async def _wait_ready(self) -> None:
        """Start the link on first use and wait for its handshake: the whole first-step budget
        when the edge has no alternative (no exit head), a step's budget otherwise, once (the
        streams starting together share that wait); a link lost after it was ready is not
        waited for when the exit head can answer (it reconnects in the background)."""
        link = self.link
        if link is None:
            return
        if not self._link_started:
            self._link_started = True
            if not link.ready:
                await link.start()
        if link.ready:
            self._seen_ready = True
            return
        if self.has_exit and self._seen_ready:
            return
        wait = self._ready_wait
        if wait is None or (wait.done() and not self.has_exit):
            budget = self.config.timeout_s if self.has_exit or self._seen_ready \
                else self.config.first_timeout_s
            wait = self._ready_wait = asyncio.ensure_future(link.wait_ready(budget))
        elif wait.done():
            return          # waited once already: the exit head answers meanwhile
        self._seen_ready = await asyncio.shield(wait) or self._seen_ready

    async def _cloud_step(self, s: _Session) -> tuple[int, int, int]:
        if self.link is None:
            raise PeerUnavailableError("no cloud link configured")
        pending = s.pending()
        if s.cloud_length and len(pending) > self.config.max_catchup_tokens:
            s.cloud_length, pending = 0, torch.cat(s.hidden)
        encoded = self.codec.encode(pending)
        fingerprint = "" if s.cloud_length else self.fingerprint   # DECODE: bound by PREFILL
        # a PREFILL may meet a cold cloud that builds its part of the model first
        timeout = self.config.timeout_s if s.cloud_length else self.config.first_timeout_s
        common = dict(request_id=0, session_id=s.id, fingerprint=fingerprint,
                      split=self.split, codec=self.config.codec, position=s.cloud_length,
                      token_count=len(pending), codec_header=encoded.header,
                      deadline_s=timeout, payload=tuple(encoded.payload))
        sampling = s.sampling
        msg = P.Decode(**common) if s.cloud_length else P.Prefill(
            **common, temperature=sampling.temperature, top_k=sampling.top_k,
            top_p=sampling.top_p, seed=sampling.seed)
        reply = await self.link.session(msg, timeout)     # request id: the link's
        if not reply.result.tensors:
            raise ProtocolError("expected a RESULT with the next token, got an empty one")
        s.cloud_length = s.length
        return int(reply.result.tensor(0).reshape(-1)[0]), reply.bytes_sent, reply.bytes_received

    async def _close_session(self, s: _Session) -> None:
        if self.link is None or not s.cloud_length or not self.link.ready:
            return
        try:
            await self.link.session(P.Close(0, s.id), min(0.5, self.config.timeout_s))
        except TetherError:
            pass    # the cloud expires it anyway

    async def generate_text(self, prompt: str, max_new_tokens: int = 64, *,
                            sampling: SamplingParams | None = None) -> tuple[str, list[TokenEvent]]:
        """The whole continuation and its events (convenience for non-streaming callers)."""
        events = [e async for e in self.generate(prompt, max_new_tokens, sampling=sampling)]
        return "".join(e.text for e in events), events


def open_llm_edge(checkpoint: Path, tokenizer: Path | None = None, split: int | None = None,
                  codec: str = "fp16", cloud: str = "", exit_head: Path | None = None,
                  exit_threshold: float | None = None, timeout_s: float = 2.0,
                  first_step_timeout_s: float = 30.0, link: CloudLink | None = None,
                  curve: Any = None, timing: Any = None, edge_id: str = "llm-edge") -> LLMEdge:
    """An :class:`LLMEdge` for layers ``[0, split)`` of ``checkpoint`` (default: half the
    layers), with its exit head and threshold (``exit_head``'s calibrated one unless given).

    Its cloud: ``link`` when given (shared with the image path: one socket), else a new
    :class:`~tether.edge.zmq_link.ZmqCloudLink` to ``cloud`` (with ``curve`` keys and
    ``timing``); neither: edge only.
    """
    from tether.partitioner.llm import load_exit_head, num_layers, open_llm, read_exit_meta

    ckpt = open_llm(checkpoint, tokenizer)
    k = split if split is not None else num_layers(ckpt.config) // 2
    part = EdgeLM(ckpt, k)
    if exit_head is not None:
        part.exit_head = load_exit_head(part, exit_head)
        meta = read_exit_meta(exit_head)
        if meta.get("split") not in (None, k):
            raise ConfigError(f"{exit_head} was trained for split {meta['split']}, not {k}")
        exit_threshold = exit_threshold if exit_threshold is not None else meta.get("threshold")
    config = GenerateConfig(codec=codec, exit_threshold=exit_threshold, timeout_s=timeout_s,
                            first_step_timeout_s=first_step_timeout_s)
    tok = ckpt.tokenizer()
    if tok is None:
        raise ConfigError(f"{checkpoint} has no tokenizer: pass its tokenizer file")
    edge = LLMEdge(part, ckpt.fingerprint, tok, config, model_id=Path(checkpoint).stem)
    if link is None and cloud:
        from tether.edge.zmq_link import LinkTiming, ZmqCloudLink
        link = ZmqCloudLink(cloud, edge.bundle_info(), edge_id, timing or LinkTiming(), curve)
    if link is not None:
        edge.attach(link)
    return edge


class _Detokenizer:
    """Incremental text: byte-level for llama2.c tokenizers, decode-and-diff for HF ones."""

    def __init__(self, tokenizer: Any, prev: int) -> None:
        self.tokenizer, self.prev = tokenizer, prev
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []
        self._text = ""

    def feed(self, token: int) -> str:
        if hasattr(self.tokenizer, "token_bytes"):
            out = self._utf8.decode(self.tokenizer.token_bytes(token, self.prev))
            self.prev = token
            return out
        self._ids.append(token)
        text = self.tokenizer.decode(self._ids)
        new, self._text = text[len(self._text):], text
        return new
