"""LLM sessions on the cloud: a KV cache per session, batched decode steps, expiry, memory bound.

:class:`LLMEngine` is the compute side that a service dispatches PREFILL/DECODE/CLOSE to::

    engine = LLMEngine(checkpoint, LLMEngineConfig())
    await engine.start()
    reply = await engine.handle(msg)    # a protocol Result or Error; never raises
    await engine.close()

IO never computes: ``handle`` queues a job (a bounded queue: BUSY when ``max_queue`` steps
wait) and awaits it; one worker task drains the queue,
groups single-token DECODEs of the same split into one batched forward pass (sessions of
different lengths are left-padded and masked; each session's new KV row is appended to its
own cache afterwards) and runs everything else one by one, in a worker thread.

Session rules: PREFILL (position 0) creates or replaces a session and checks the fingerprint;
a DECODE may leave ``fingerprint`` empty (the session is bound to it; saves 64 bytes a
token) and must start at the
position the session holds (``token_count`` > 1 is the edge catching up tokens it answered
itself); anything else -- unknown, expired, evicted, out of step -- is a
:class:`~tether.core.errors.SessionError` so the edge re-prefills. Idle sessions expire after
``idle_timeout_s``; when the KV caches exceed ``max_kv_bytes`` or ``max_sessions`` the least
recently used other sessions are evicted (the last resort: the cloud core's
:class:`~tether.cloud.sessions.SessionGate` refuses new sessions with BUSY before that, with
these same bounds, :attr:`LLMEngine.session_limits`). A step whose ``deadline_s`` passed
while it waited is answered DEADLINE without compute. A RESULT carries two tensors: the next
token id (int64 ``[1]``) and its probability (float32 ``[1]``). The token is chosen by
:func:`~tether.partitioner.llm.choose_token` under the sampling settings the PREFILL bound to
the session (greedy by default; seeded draws depend only on the seed and token position).

Served by the cloud service like any bundle (``CloudServer(..., sessions=engine)``: the
same socket, handshake, CURVE, admission, drain and metrics); :class:`LLMServer` is that
service with the engine alone (``tether cloud --llm-checkpoint`` without a bundle).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from tether.cloud.sessions import SessionLimits
from tether.codecs import TENSOR_CODEC_IDS, decode_hidden, hidden_codec
from tether.core import protocol as P
from tether.core.errors import (BundleError, BusyError, ConfigError, DeadlineExceededError,
                                ProtocolError, SessionError, TetherError, UnknownCodecError)
from tether.partitioner.llm import (CloudLM, LLMCheckpoint, SamplingParams, choose_token,
                                    num_layers, parse_split,
                                    split_name)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LLMEngineConfig:
    """Bounds of the cloud's LLM sessions."""

    max_sessions: int = 64
    max_kv_bytes: int = 256 * 1024 * 1024
    max_session_tokens: int = 0          # 0: the model's max_position_embeddings
    idle_timeout_s: float = 120.0
    max_batch: int = 16
    max_queue: int = 256                 # session steps waiting; beyond: BUSY "queue_full"
    splits: tuple[int, ...] = ()         # split layers served (preloaded); empty: any, lazily
    codecs: tuple[str, ...] = ()         # hidden-state codecs accepted; empty: all

    def __post_init__(self) -> None:
        if min(self.max_sessions, self.max_kv_bytes, self.max_batch, self.max_queue) < 1:
            raise ConfigError("max_sessions, max_kv_bytes, max_batch and max_queue must be positive")
        if self.idle_timeout_s <= 0 or self.max_session_tokens < 0:
            raise ConfigError("idle_timeout_s must be > 0 and max_session_tokens >= 0")
        try:     # current names (old LLM names int8/int4 are int8-token/int4-token)
            object.__setattr__(self, "codecs", tuple(hidden_codec(c).codec_id for c in self.codecs))
        except UnknownCodecError as exc:
            raise ConfigError(f"LLM codecs: {exc}") from exc


@dataclass
class _Session:
    id: str
    k: int
    cache: Any
    length: int = 0
    last_used: float = field(default_factory=time.monotonic)
    kv_bytes: int = 0
    sampling: SamplingParams = SamplingParams()


@dataclass
class _Job:
    msg: Any
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)
    started: float = 0.0


def _kv(cache: Any, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[i].keys, layers[i].values
    return cache.key_cache[i], cache.value_cache[i]     # transformers < 4.56


def _cache_layers(cache: Any) -> int:
    layers = getattr(cache, "layers", None)
    return len(layers) if layers is not None else len(cache.key_cache)


def _cache_bytes(cache: Any) -> int:
    total = 0
    for i in range(_cache_layers(cache)):
        k, v = _kv(cache, i)
        total += k.numel() * k.element_size() + v.numel() * v.element_size()
    return total


class LLMEngine:
    """Cloud part(s) of one checkpoint and the sessions running on them."""

    def __init__(self, ckpt: LLMCheckpoint, config: LLMEngineConfig = LLMEngineConfig(),
                 model_id: str = "llm") -> None:
        self.ckpt, self.config, self.model_id = ckpt, config, model_id
        self.fingerprint = ckpt.fingerprint
        self.n_layers = num_layers(ckpt.config)
        self.max_tokens = config.max_session_tokens or int(
            getattr(ckpt.config, "max_position_embeddings", 0) or
            getattr(ckpt.config, "n_positions", 0) or 1 << 16)
        self.sessions: dict[str, _Session] = {}
        self._parts: dict[int, CloudLM] = {k: CloudLM(ckpt, k) for k in config.splits}
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tether-llm")
        self.stats = {"batches": 0, "batched_rows": 0, "evicted": 0, "expired": 0}

    @property
    def bundle(self) -> P.BundleInfo:
        splits = self.config.splits or range(self.n_layers + 1)
        return P.BundleInfo(self.model_id, self.fingerprint, tuple(split_name(k) for k in splits),
                            tuple(self.config.codecs or TENSOR_CODEC_IDS))

    @property
    def kv_bytes(self) -> int:
        return sum(s.kv_bytes for s in list(self.sessions.values()))

    @property
    def session_limits(self) -> SessionLimits:
        """The bounds the cloud core admits sessions with (this engine's)."""
        c = self.config
        return SessionLimits(c.max_sessions, c.max_kv_bytes, c.max_queue, c.idle_timeout_s)

    async def start(self) -> None:
        if self._worker is None:
            self._queue = asyncio.Queue(self.config.max_queue)
            self._worker = asyncio.create_task(self._work(), name="tether-llm-engine")

    async def close(self) -> None:
        task, self._worker = self._worker, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._pool.shutdown(wait=True)

    async def close_sessions(self) -> None:
        """Drop every session (after the in-flight batch: the compute thread does it)."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._pool, self.sessions.clear)
        except RuntimeError:        # the pool is shut down: nothing computes any more
            self.sessions.clear()

    async def handle(self, msg: Any) -> Any:
        """Answer one PREFILL/DECODE/CLOSE with a Result, Busy or Error message."""
        if self._queue is None:
            await self.start()
        job = _Job(msg, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(job)   # type: ignore[union-attr]
        except asyncio.QueueFull:
            return P.Busy(msg.request_id, "queue_full", self._queue.qsize())  # type: ignore
        return await job.future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:    # idle sessions expire even when no request arrives
                first = await asyncio.wait_for(self._queue.get(),  # type: ignore[union-attr]
                                               self.config.idle_timeout_s / 2)
            except asyncio.TimeoutError:
                self.expire()
                continue
            jobs = [first]
            while not self._queue.empty() and len(jobs) < 4 * self.config.max_batch:  # type: ignore
                jobs.append(self._queue.get_nowait())   # type: ignore[union-attr]
            replies = await loop.run_in_executor(self._pool, self.run_jobs, jobs)
            for job, reply in zip(jobs, replies):
                if not job.future.done():
                    job.future.set_result(reply)

    # ---- compute (worker thread) -------------------------------------------------------

    def run_jobs(self, jobs: list[_Job]) -> list[Any]:
        """Run queued jobs: single-token decodes batched per split, the rest in order."""
        started = time.perf_counter()
        for job in jobs:
            job.started = started
        self.expire()
        replies: dict[int, Any] = {}
        self._expired(jobs, replies)
        batches: dict[int, list[int]] = {}
        single = [isinstance(j.msg, P.Decode) and j.msg.token_count == 1 and i not in replies
                  for i, j in enumerate(jobs)]
        # a session with any other job in this drain keeps its jobs in arrival order
        seen = {getattr(j.msg, "session_id", None) for i, (j, one) in enumerate(zip(jobs, single))
                if not one and i not in replies}
        for i, job in enumerate(jobs):
            m = job.msg
            if single[i] and m.session_id not in seen and m.session_id in self.sessions:
                seen.add(m.session_id)
                batches.setdefault(self.sessions[m.session_id].k, []).append(i)
        for rows in batches.values():
            for start in range(0, len(rows), self.config.max_batch):
                chunk = rows[start:start + self.config.max_batch]
                replies.update(zip(chunk, self._guard_batch([jobs[i] for i in chunk])))
        for i, job in enumerate(jobs):
            if i not in replies:
                replies[i] = self._guard_batch([job])[0]
        return [replies[i] for i in range(len(jobs))]

    def _expired(self, jobs: list[_Job], replies: dict[int, Any]) -> None:
        """DEADLINE for each step whose ``deadline_s`` passed while it waited (no compute)."""
        for i, job in enumerate(jobs):
            deadline = getattr(job.msg, "deadline_s", None)
            waited = job.started - job.arrived
            if deadline is not None and waited > deadline:
                replies[i] = P.Error(job.msg.request_id, DeadlineExceededError.code,
                                     f"deadline of {deadline:.3f} s passed after {waited:.3f} s "
                                     "in the LLM queue; dropped before compute")

    def _guard_batch(self, jobs: list[_Job]) -> list[Any]:
        try:
            if len(jobs) == 1 and not isinstance(jobs[0].msg, P.Decode):
                return [self._single(jobs[0])]
            return self._decode(jobs)
        except TetherError as exc:
            return [P.Error.from_exception(j.msg.request_id, exc) for j in jobs]
        except Exception as exc:   # a bug must not take the service down
            log.exception("LLM engine failed on %d job(s)", len(jobs))
            return [P.Error.from_exception(j.msg.request_id, exc) for j in jobs]

    def _single(self, job: _Job) -> Any:
        m = job.msg
        if isinstance(m, P.Close):
            self.drop(m.session_id)
            return P.Result(m.request_id)
        if isinstance(m, P.Prefill):
            return self._prefill(job)
        raise ProtocolError(f"the LLM engine does not handle {type(m).__name__} messages")

    def _part(self, msg: Any) -> CloudLM:
        if msg.fingerprint != self.fingerprint:
            raise BundleError(f"edge runs checkpoint {msg.fingerprint[:12]}, this cloud serves "
                              f"{self.fingerprint[:12]} ({self.model_id}): deploy the same weights")
        k = parse_split(msg.split, self.ckpt.config)
        if k not in self._parts:
            if self.config.splits:
                raise BundleError(f"split {msg.split} not served; served: "
                                  f"{[split_name(s) for s in self.config.splits]}")
            self._parts[k] = CloudLM(self.ckpt, k)
        return self._parts[k]

    def _session_part(self, msg: Any, session: _Session) -> CloudLM:
        """The part a DECODE runs on: its session's (PREFILL checked the fingerprint)."""
        if msg.fingerprint and msg.fingerprint != self.fingerprint:
            raise BundleError(f"edge runs checkpoint {msg.fingerprint[:12]}, this cloud serves "
                              f"{self.fingerprint[:12]} ({self.model_id}): deploy the same weights")
        if msg.split and parse_split(msg.split, self.ckpt.config) != session.k:
            raise SessionError(f"DECODE for {msg.split} but session {session.id!r} runs "
                               f"{split_name(session.k)}: re-prefill")
        return self._parts[session.k]

    def _hidden(self, msg: Any, part: CloudLM) -> tuple[torch.Tensor, float]:
        codec = hidden_codec(msg.codec)
        if self.config.codecs and codec.codec_id not in self.config.codecs:
            raise UnknownCodecError(f"codec {msg.codec!r} not accepted; use one of "
                                    f"{list(self.config.codecs)}")
        t0 = time.perf_counter()
        h = decode_hidden(codec, msg.codec_header, msg.payload, int(part.config.hidden_size),
                          msg.token_count)
        return h, time.perf_counter() - t0

    def _prefill(self, job: _Job) -> Any:
        m = job.msg
        part = self._part(m)
        if m.position != 0:
            raise SessionError(f"PREFILL must start at position 0, got {m.position}")
        if m.token_count > self.max_tokens:
            raise SessionError(f"prompt of {m.token_count} tokens exceeds the session limit "
                               f"of {self.max_tokens}")
        h, decode_s = self._hidden(m, part)
        self.drop(m.session_id)
        session = _Session(m.session_id, part.k, part.new_cache(), sampling=m.sampling.resolved())
        t0 = time.perf_counter()
        logits = part(h.unsqueeze(0), session.cache)
        tail_s = time.perf_counter() - t0
        self._commit(session, m.token_count)
        return self._result(job, session, logits[0, -1], decode_s, tail_s, 1)

    def _session(self, msg: Any) -> _Session:
        s = self.sessions.get(msg.session_id)
        if s is None:
            raise SessionError(f"unknown or expired session {msg.session_id!r}: re-prefill")
        if msg.position != s.length:
            raise SessionError(f"session {msg.session_id!r} holds {s.length} tokens but DECODE "
                               f"starts at position {msg.position}: re-prefill")
        if s.length + msg.token_count > self.max_tokens:
            self.drop(s.id)
            raise SessionError(f"session {msg.session_id!r} reached the limit of "
                               f"{self.max_tokens} tokens")
        return s

    def _decode(self, jobs: list[_Job]) -> list[Any]:
        """DECODE jobs of one split: invalid ones answered alone, the rest in one pass."""
        replies: list[Any] = [None] * len(jobs)
        rows = []
        for i, job in enumerate(jobs):
            try:
                session = self._session(job.msg)
                part = self._session_part(job.msg, session)
                rows.append((i, part, session, *self._hidden(job.msg, part)))
            except TetherError as exc:
                replies[i] = P.Error.from_exception(job.msg.request_id, exc)
        if rows:
            part, sessions = rows[0][1], [r[2] for r in rows]
            t0 = time.perf_counter()
            if len(rows) == 1:
                logits = part(rows[0][3].unsqueeze(0), sessions[0].cache)[:, -1]
            else:
                logits = self._batched_step(part, sessions, [r[3] for r in rows])
                self.stats["batches"] += 1
                self.stats["batched_rows"] += len(rows)
            tail_s = time.perf_counter() - t0
            for (i, _, session, _, decode_s), row in zip(rows, logits):
                try:
                    self._commit(session, jobs[i].msg.token_count)
                    replies[i] = self._result(jobs[i], session, row, decode_s, tail_s, len(rows))
                except TetherError as exc:
                    replies[i] = P.Error.from_exception(jobs[i].msg.request_id, exc)
        return replies

    def _batched_step(self, part: CloudLM, sessions: list[_Session],
                      hidden: list[torch.Tensor]) -> torch.Tensor:
        """One token for each session in one forward pass; caches appended row by row."""
        from transformers import DynamicCache
        longest = max(s.length for s in sessions)
        layers = _cache_layers(sessions[0].cache)
        data = []
        for i in range(layers):
            ks, vs = zip(*(_kv(s.cache, i) for s in sessions))
            data.append((torch.cat([F.pad(k, (0, 0, longest - k.shape[2], 0)) for k in ks]),
                         torch.cat([F.pad(v, (0, 0, longest - v.shape[2], 0)) for v in vs])))
        cache = DynamicCache(data) if layers else DynamicCache()
        mask = torch.zeros(len(sessions), longest + 1, dtype=torch.long)
        for row, s in enumerate(sessions):
            mask[row, longest - s.length:] = 1
        positions = torch.tensor([[s.length] for s in sessions])
        logits = part(torch.stack(hidden), cache, attention_mask=mask, position_ids=positions)
        for i in range(layers):
            k, v = _kv(cache, i)
            for row, s in enumerate(sessions):
                s.cache.update(k[row:row + 1, :, -1:].clone(), v[row:row + 1, :, -1:].clone(), i)
        return logits[:, -1]

    def _commit(self, session: _Session, tokens: int) -> None:
        session.length += tokens
        session.last_used = time.monotonic()
        session.kv_bytes = _cache_bytes(session.cache)
        self.sessions[session.id] = session
        self._enforce_bounds(keep=session.id)

    def _result(self, job: _Job, session: _Session, logits: torch.Tensor, decode_s: float,
                tail_s: float, batch: int) -> P.Result:
        """The next token (position ``session.length``) under the session's sampling."""
        token, p = choose_token(logits, session.sampling, session.length)
        tok_desc, tok_view = P.tensor_frame(torch.tensor([token], dtype=torch.int64))
        p_desc, p_view = P.tensor_frame(torch.tensor([p], dtype=torch.float32))
        return P.Result(job.msg.request_id, (tok_desc, p_desc), (tok_view, p_view),
                        queue_s=max(0.0, job.started - job.arrived), decode_s=decode_s,
                        tail_s=tail_s, batch_size=batch)

    # ---- session bookkeeping -----------------------------------------------------------

    def drop(self, session_id: str) -> bool:
        return self.sessions.pop(session_id, None) is not None

    def expire(self, now: float | None = None) -> int:
        """Drop sessions idle longer than ``idle_timeout_s``; return how many."""
        now = time.monotonic() if now is None else now
        old = [s.id for s in self.sessions.values()
               if now - s.last_used > self.config.idle_timeout_s]
        for sid in old:
            self.drop(sid)
        self.stats["expired"] += len(old)
        return len(old)

    def _enforce_bounds(self, keep: str) -> None:
        while (self.kv_bytes > self.config.max_kv_bytes or
               len(self.sessions) > self.config.max_sessions):
            others = [s for s in self.sessions.values() if s.id != keep]
            if not others:
                self.drop(keep)
                raise BusyError(f"one session needs more than max_kv_bytes="
                                f"{self.config.max_kv_bytes}: raise it or shorten the prompt")
            victim = min(others, key=lambda s: s.last_used)
            self.drop(victim.id)
            self.stats["evicted"] += 1
            log.info("evicted LLM session %s (LRU) to stay within bounds", victim.id)


class LLMServer:
    """An LLM-only cloud (``tether cloud --llm-checkpoint`` without a bundle): the cloud service (:class:`~tether.cloud.server.CloudServer`)
    serving one engine's sessions and no image bundle: the same socket, handshake, CURVE,
    admission, drain and metrics as any cloud."""

    def __init__(self, engine: LLMEngine, endpoint: str, server_id: str = "tether-llm",
                 limits: P.Limits = P.DEFAULT_LIMITS, metrics: Any = None,
                 config: Any = None) -> None:
        from tether.cloud.config import CloudConfig
        from tether.cloud.server import CloudServer
        self.engine = engine
        config = config or CloudConfig(bind=endpoint, server_id=server_id, preload=False,
                                       max_message_bytes=limits.max_message_bytes)
        self.server = CloudServer(config, [], metrics, sessions=engine)
        self.endpoint = endpoint

    @property
    def core(self) -> Any:
        return self.server.core

    async def start(self) -> str:
        """Bind and start serving; returns the bound endpoint (``tcp://127.0.0.1:0`` works)."""
        await self.engine.start()
        await self.server.start()
        self.endpoint = self.server.endpoint
        return self.endpoint

    async def close(self) -> None:
        """Drain (every open step answered once), close the sessions, release the engine."""
        await self.server.stop()
        await self.engine.close()
