"""The edge's HTTP front (``tether edge --http-port P``): images and OpenAI-style generation.

Starlette on uvicorn, served on the daemon's own event loop (the ZeroMQ endpoint stays)::

    POST /v1/infer               image file (multipart field ``file``/``image``, or a raw
                                 ``image/*`` body) or a raw tensor (``application/x-npy``:
                                 uint8 HWC or float NCHW in [0, 1]); ``?deadline=S``
                                 -> JSON: prediction, label, logits, action, outcome,
                                 fallback_reason, timings, record
    POST /v1/completions         OpenAI completions, ``stream`` true: server-sent events;
                                 greedy unless ``temperature`` > 0 (``top_p``, ``top_k``, ``seed``)
    POST /v1/chat/completions    OpenAI chat completions (same)
    GET  /v1/models              the served models
    GET  /healthz, /readyz, /metrics   the same probes as the metrics port (tether.core.http)

Errors use OpenAI's ``{"error": {"message", "type", "code"}}`` with 400 (bad input), 404
(unknown model), 413 (too large), 503 (busy, draining, no cloud and no local answer) or 504.
Only this module imports starlette and uvicorn (the ``[http]`` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
import socket
from typing import TYPE_CHECKING, Any, AsyncIterator

import numpy as np

from tether.core.errors import (BusyError, ConfigError, DeadlineExceededError, InputShapeError,
                                PeerUnavailableError, ProtocolError, TetherError, TooLargeError,
                                TransientError, UnknownModelError)
from tether.core.http import PROBE_PATHS, probe_response
from tether.edge.openai_api import (CompletionRequest, ResponseShape, StopMatcher, error_body,
                                    parse_request, sse)
from tether.edge.server import open_generation

if TYPE_CHECKING:
    from tether.edge.daemon import EdgeDaemon

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError as exc:   # pragma: no cover - exercised only without the extra
    raise ConfigError("the HTTP front needs starlette and uvicorn: pip install 'tether[http]'") \
        from exc

log = logging.getLogger(__name__)
_STATUS = {TooLargeError: 413, InputShapeError: 400, ProtocolError: 400, ConfigError: 400,
           DeadlineExceededError: 504, TransientError: 503}     # most specific class wins
_IMAGE_FIELDS = ("file", "image")


def status_for(exc: TetherError) -> int:
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 400 if exc.code in ("unknown_split", "unknown_codec", "bad_payload") else 500


def error_response(exc: TetherError, status: int | None = None) -> "JSONResponse":
    status = status or status_for(exc)
    kind = "invalid_request_error" if status < 500 else "server_error"
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(error_body(str(exc), exc.code, kind), status, headers=headers)


def decode_image(data: bytes, height: int, width: int) -> np.ndarray:
    """An encoded image (any format Pillow reads) as uint8 RGB HWC at (height, width)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (width, height))        # JPEG: decode at a reduced size
            rgb = img.convert("RGB").resize((width, height), Image.BILINEAR)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise InputShapeError(f"cannot read the uploaded image: {exc}") from exc
    return np.asarray(rgb, dtype=np.uint8)


def decode_npy(data: bytes) -> np.ndarray:
    """A ``.npy`` body (numpy's format; pickled objects refused)."""
    try:
        stream = io.BytesIO(data)
        version = np.lib.format.read_magic(stream)
        shape, _, dtype = np.lib.format._read_array_header(stream, version)
        if dtype.hasobject or dtype.kind not in "biuf" or \
                math.prod(shape) * dtype.itemsize > len(data):
            raise ValueError(f"a numeric tensor whose data is in the body is needed, got "
                             f"dtype {dtype} shape {shape}")
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputShapeError(f"body is not a valid .npy tensor: {exc}") from exc


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the daemon's loop: the daemon owns SIGTERM/SIGINT, not uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self):   # type: ignore[override]
        yield

    def install_signal_handlers(self) -> None:   # older uvicorn
        return None


class HttpFront:
    """Serves the daemon's agent (and LLM) over HTTP; admission shares its limits."""

    def __init__(self, daemon: "EdgeDaemon") -> None:
        self.daemon = daemon
        self.agent, self.llm, self.config = daemon.agent, daemon.llm, daemon.config
        self._slots = asyncio.Semaphore(self.config.max_inflight)
        self._waiting = 0
        self.active = 0          # requests and streams in progress
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task | None = None
        self.app = Starlette(routes=[
            Route("/v1/infer", self.infer, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            *(Route(p, self.probe, methods=["GET", "HEAD"]) for p in PROBE_PATHS)])

    # ---- life cycle ----------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        """Bind (port 0: a free one) and serve on the running loop; returns the port."""
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot serve HTTP on {host}:{port}: {exc}; choose another "
                              "--http-port") from exc
        sock.listen(128)
        config = uvicorn.Config(self.app, lifespan="off", log_level="warning",
                                access_log=False, timeout_graceful_shutdown=1)
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="edge-http")
        while not self._server.started and not self._task.done():
            await asyncio.sleep(0.005)
        if self._task.done():
            self._task.result()      # raises what uvicorn failed with
        return int(sock.getsockname()[1])

    async def wait_idle(self, seconds: float) -> None:
        """Once the daemon drains nothing new is admitted (503); let running requests and
        streams finish, for up to ``seconds``."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while self.active and loop.time() < end:
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.gather(self._task, return_exceptions=True)
            self._server = None

    # ---- routes --------------------------------------------------------------------------

    async def probe(self, request: "Request") -> "Response":
        status, ctype, body = probe_response(request.url.path, self.daemon.registry,
                                             self.daemon.health)
        return Response(body, status, media_type=ctype)

    async def models(self, request: "Request") -> "JSONResponse":
        ids = ([self.agent.compute.manifest.model_id] if self.agent else []) + \
            ([self._llm_id()] if self.llm else [])
        return JSONResponse({"object": "list", "data": [
            {"id": i, "object": "model", "created": 0, "owned_by": "tether"} for i in ids]})

    async def infer(self, request: "Request") -> "Response":
        if self.agent is None:
            return error_response(UnknownModelError(
                "this edge serves no image model (started without a bundle)"), 404)
        try:
            self._admit()
            image = await self._read_tensor(request)
            deadline = _float_param(request, "deadline")
            result = await self._run_admitted(image, deadline)
        except TetherError as exc:
            return error_response(exc)
        record = result.record.to_dict()
        labels = self.agent.compute.manifest.preprocess.get("labels")
        label = labels[result.prediction] if isinstance(labels, list) and \
            0 <= result.prediction < len(labels) else ""
        return JSONResponse({
            "model": self.agent.compute.manifest.model_id, "prediction": result.prediction,
            "label": str(label), "logits": result.logits.reshape(-1).tolist(),
            "action": record["action"], "outcome": record["outcome"],
            "fallback_reason": record["fallback_reason"],
            "timings": {k.removesuffix("_seconds"): v for k, v in record.items()
                        if k.endswith("_seconds")},
            "record": record})

    async def _run_admitted(self, image: np.ndarray, deadline: float | None) -> Any:
        """At most ``max_inflight`` requests run; ``queue_size`` more may wait."""
        self._waiting += 1
        self.active += 1
        waiting = True
        try:
            async with self._slots:
                self._waiting, waiting = self._waiting - 1, False
                return await self.agent.infer(image, deadline)
        finally:
            self.active -= 1
            if waiting:
                self._waiting -= 1

    def _admit(self) -> None:
        if self.daemon.draining:
            raise BusyError("the edge is draining (shutting down); retry on another edge")
        if self._waiting >= self.config.queue_size:
            raise BusyError(f"queue full ({self._waiting} waiting); retry later")

    async def _read_tensor(self, request: "Request") -> np.ndarray:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            data = await self._form_file(request)
        else:
            data = await self._body(request)
        if ctype in ("application/x-npy", "application/npy"):
            return await asyncio.to_thread(decode_npy, data)
        if ctype and not (ctype.startswith("image/") or ctype in (
                "multipart/form-data", "application/octet-stream")):
            raise InputShapeError(f"unsupported Content-Type {ctype!r}: send an image file "
                                  "(multipart field 'file', or image/*) or application/x-npy")
        shape = self.agent.compute.manifest.input.shape
        # decoding a large upload takes a while: off the event loop that serves every front
        return await asyncio.to_thread(decode_image, data, int(shape[2]), int(shape[3]))

    async def _body(self, request: "Request") -> bytes:
        limit = self.config.http.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        if not size:
            raise InputShapeError("empty body: send an image or a .npy tensor")
        return b"".join(chunks)

    async def _form_file(self, request: "Request") -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and \
                int(declared) > self.config.http.max_body_bytes:
            raise _too_large(self.config.http.max_body_bytes)
        async with request.form(max_files=1, max_fields=8) as form:
            for name in _IMAGE_FIELDS:
                upload = form.get(name)
                if upload is not None and hasattr(upload, "read"):
                    return await upload.read()
        raise InputShapeError("multipart upload needs a file field named 'file' or 'image'")

    # ---- OpenAI-compatible generation ----------------------------------------------------

    async def completions(self, request: "Request") -> "Response":
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: "Request") -> "Response":
        return await self._generate(request, chat=True)

    def _llm_id(self) -> str:
        return self.daemon.server.llm_model_id

    async def _generate(self, request: "Request", chat: bool) -> "Response":
        try:
            if self.llm is None:
                raise PeerUnavailableError("this edge serves no LLM: start it with "
                                           "--llm-checkpoint")
            self._admit()
            try:
                body = await request.json()
            except ValueError as exc:
                raise ConfigError(f"the body is not JSON: {exc}") from exc
            req = parse_request(body, chat, self.llm.tokenizer, self.daemon.server.llm_max_new_tokens)
            if req.model and req.model != self._llm_id():
                return JSONResponse(error_body(f"model {req.model!r} not served here; "
                                               f"GET /v1/models lists {self._llm_id()!r}",
                                               "model_not_found"), 404)
        except TetherError as exc:
            return error_response(exc)
        shape = ResponseShape(req, self._llm_id())
        if req.stream:
            return StreamingResponse(self._stream(req, shape), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._complete(req, shape)

    async def _complete(self, req: CompletionRequest, shape: ResponseShape) -> "Response":
        text, count, sources, stopped = [], 0, {}, False
        try:
            async with contextlib.aclosing(self._tokens(req)) as tokens:
                async for piece, source, stopped in tokens:
                    text.append(piece)
                    if source is not None:
                        count += 1
                        sources[source] = sources.get(source, 0) + 1
        except TetherError as exc:
            return error_response(exc)
        finish = "stop" if stopped or count < req.max_tokens else "length"
        return JSONResponse(shape.full("".join(text), finish, self._usage(req, count), sources))

    async def _stream(self, req: CompletionRequest, shape: ResponseShape) -> AsyncIterator[bytes]:
        count, stopped, first = 0, False, True
        try:
            async with contextlib.aclosing(self._tokens(req)) as tokens:
                async for piece, source, stopped in tokens:
                    count += source is not None
                    yield sse(shape.chunk(piece, None, first, source))
                    first = False
        except TetherError as exc:       # headers are gone: the error travels as an event
            yield sse(error_body(str(exc), exc.code, "server_error"))
            yield sse("[DONE]")
            return
        finish = "stop" if stopped or count < req.max_tokens else "length"
        yield sse(shape.chunk(None, finish, first))
        if req.include_usage:
            yield sse(shape.usage_chunk(self._usage(req, count)))
        yield sse("[DONE]")

    async def _tokens(self, req: CompletionRequest) -> AsyncIterator[tuple[str, str | None, bool]]:
        """(text, source, stopped) per generated token, cut at the first stop string; a last
        (text, None, False) releases text held back as a possible stop prefix."""
        matcher = StopMatcher(req.stop)
        self.active += 1
        try:
            generation = open_generation(self.llm, req.generate_request(),
                                         self.daemon.server.llm_max_new_tokens)
            async with self._slots, contextlib.aclosing(generation) as events:
                async for ev in events:
                    piece = matcher.feed(ev.text)
                    yield piece, ev.source, matcher.stopped
                    if matcher.stopped:
                        return
        finally:
            self.active -= 1
        tail = matcher.flush()
        if tail:
            yield tail, None, False

    def _usage(self, req: CompletionRequest, completion: int) -> dict[str, int]:
        prompt = len(self.llm.tokenizer.encode(req.prompt))
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}


def _too_large(limit: int) -> TooLargeError:
    return TooLargeError(f"body larger than http_max_body_bytes={limit}")


def _float_param(request: "Request", name: str) -> float | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError as exc:
        raise InputShapeError(f"query parameter {name}={raw!r} is not a number") from exc
    if not value > 0:
        raise InputShapeError(f"query parameter {name} must be > 0 seconds")
    return value
