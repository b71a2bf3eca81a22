"""One formed batch of INFER requests: decode every payload, run the tail once, split the rows.

:class:`~tether.cloud.core.CloudCore` admits requests into :class:`Job` s, queues them per
:class:`Group` ``(bundle, split, codec)`` and hands a formed batch to its executor
(:mod:`tether.cloud.executor`), which calls :func:`run_batch` in a compute thread (or a Ray
tail worker, :mod:`tether.cloud.ray_dispatch`). No asyncio, no sockets here::

    run_batch(group, jobs, max_request_samples) -> (replies, BatchStats | None)
    expired(job, now) -> P.Error           the typed DEADLINE reply of a job past its deadline

A request's own fault (undecodable payload, wrong shape, expired deadline) becomes its own
ERROR reply; a failing tail answers the batch's requests with ERROR. Nothing raises.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from tether.cloud.admission import CostModel
from tether.cloud.bundles import ServedBundle
from tether.core import protocol as P
from tether.core.checks import require_finite
from tether.core.errors import DeadlineExceededError, InputShapeError, PayloadError, TetherError
from tether.core.metrics import BatchStats

log = logging.getLogger(__name__)
Reply = Any   # a protocol message (Ready, Result, Busy, Error, Pong, ...)


@dataclass
class Job:
    """One admitted INFER request, answered exactly once."""

    msg: P.Infer
    received: float
    deadline: float | None
    future: asyncio.Future
    bytes_in: int
    nbytes: int = 0                       # payload bytes (the cost model's unit)
    answered: bool = False
    on_reply: Callable[[Reply], None] | None = None   # called with the reply, on the loop


@dataclass
class Group:
    """The queue of one ``(bundle, split, codec)``: what can be batched together."""

    bundle: ServedBundle
    split: str
    codec_id: str
    codec: Any
    jobs: deque = field(default_factory=deque)
    queued_bytes: int = 0                 # payload bytes of ``jobs``
    costs: CostModel = field(default_factory=CostModel)


@dataclass
class Running:
    jobs: list[Job]
    until: float                          # expected end (clock), for the admission estimate


def run_batch(group: Group, jobs: list[Job],
              max_request_samples: int) -> tuple[list[Reply], BatchStats | None]:
    """Decode every request, run the tail once on the concatenation, split the rows."""
    start = time.perf_counter()
    replies: list[Reply] = [None] * len(jobs)
    inputs: list[tuple[int, torch.Tensor, float]] = []
    for i, job in enumerate(jobs):
        t0 = time.perf_counter()
        if job.deadline is not None and t0 > job.deadline:
            replies[i] = expired(job, t0)
            continue
        try:
            x = _decode(group, job.msg, max_request_samples)
            inputs.append((i, x, time.perf_counter() - t0))
        except Exception as exc:  # noqa: BLE001 - a bad payload hurts only its sender
            replies[i] = P.Error.from_exception(job.msg.request_id, _as_payload_error(exc))
    t0 = time.perf_counter()
    inputs = [inp for inp in inputs if not _expired_now(jobs[inp[0]], t0, replies, inp[0])]
    if not inputs:
        return replies, None
    try:
        out = _tail(group, torch.cat([x for _, x, _ in inputs]) if len(inputs) > 1
                    else inputs[0][1])
    except Exception as exc:  # noqa: BLE001
        log.exception("tail of %s at %s failed", group.bundle.model_id, group.split)
        for i, _, _ in inputs:
            replies[i] = P.Error.from_exception(jobs[i].msg.request_id, exc)
        return replies, None
    tail_s = time.perf_counter() - t0
    rows = out if out.device.type == "cpu" and out.is_contiguous() else out.cpu().contiguous()
    rows = rows.numpy() if rows.dtype != torch.bfloat16 else rows   # numpy slices are cheap
    row = 0
    for i, x, decode_s in inputs:
        n = x.shape[0]
        replies[i] = P.result_for(jobs[i].msg.request_id, rows[row:row + n],
                                  queue_s=start - jobs[i].received, decode_s=decode_s,
                                  tail_s=tail_s, batch_size=len(inputs))
        row += n
    return replies, BatchStats(group.bundle.model_id, group.split, len(inputs), row, tail_s)


def _decode(group: Group, msg: P.Infer, max_request_samples: int) -> torch.Tensor:
    x = group.codec.decode(msg.codec_header, msg.payload)
    spec = group.bundle.expected(group.split)
    if not isinstance(x, torch.Tensor):
        raise PayloadError(f"codec {msg.codec!r} decoded to {type(x).__name__}, not a tensor")
    if x.dim() != len(spec.shape) or tuple(x.shape[1:]) != spec.shape[1:]:
        raise InputShapeError(f"split {group.split!r} of {group.bundle.model_id} takes "
                              f"[N, {', '.join(map(str, spec.shape[1:]))}], got {list(x.shape)}")
    if not 1 <= x.shape[0] <= max_request_samples:
        raise InputShapeError(f"a request carries 1..{max_request_samples} "
                              f"samples, got {x.shape[0]}")
    integer = spec.dtype.startswith(("int", "uint"))   # token ids of a text model
    if not x.is_floating_point() and not integer:
        raise InputShapeError(f"split {group.split!r} takes floating tensors, got {x.dtype}")
    if integer and x.is_floating_point():
        raise InputShapeError(f"split {group.split!r} takes {spec.dtype} token ids, "
                              f"got {x.dtype}")
    require_finite(x, f"the tensor at split {group.split!r}")
    return x.float() if spec.dtype == "float32" and x.dtype != torch.float32 else x


def _tail(group: Group, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = group.bundle.tail(group.split)(x)
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != x.shape[0]:
        raise TetherError(f"tail of {group.bundle.model_id} at {group.split!r} returned "
                          f"{type(out).__name__}, not one row per sample")
    return out


def expired(job: Job, now: float) -> P.Error:
    """The typed DEADLINE reply for a request whose deadline passed before compute."""
    return P.Error(job.msg.request_id, DeadlineExceededError.code,
                   f"deadline of {job.msg.deadline_s:.3f} s passed after {now - job.received:.3f} s "
                   "in the cloud's queue; dropped before compute")


def _expired_now(job: Job, now: float, replies: list[Reply], i: int) -> bool:
    """True (and ``replies[i]`` set) when ``job`` expired while its batch was decoded."""
    if job.deadline is None or now <= job.deadline:
        return False
    replies[i] = expired(job, now)
    return True


def _as_payload_error(exc: Exception) -> TetherError:
    if isinstance(exc, TetherError):
        return exc
    return PayloadError(f"payload could not be decoded ({type(exc).__name__}: {exc}); "
                        "encode it with the codec named in the request")
