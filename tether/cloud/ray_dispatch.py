"""The Ray side of the Ray pool: the tail-worker actor and the dispatcher process driving it.

This is the only module that imports ``ray`` (lazily, inside functions: importing the module
costs nothing). The front (:mod:`tether.cloud.ray_pool`) never becomes a Ray driver itself:
a Ray driver whose cluster vanishes can hang in ``ray.shutdown``/``ray.init`` (measured with
Ray 2.60: both blocked for minutes), and the front must keep answering edges. So the front
starts ``tether cloud-ray-dispatcher`` as a child process; that child is the driver, places
the :class:`TailWorker` actors, forwards batches to the slot the front chose and reports
the workers' state every ``HEARTBEAT_S``. When the cluster goes away the child exits (or
goes silent and is killed) and the front starts a fresh one until the cluster is back.

Front <-> dispatcher: one ZeroMQ PAIR socket over ``ipc://``; each message is a msgpack
header frame followed by raw frames (tether protocol messages as encoded by
:func:`tether.core.protocol.encode`). Dispatcher <-> actors: Ray task arguments holding
those same ``bytes`` frames (Ray's object store carries them; nothing torch is pickled).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import msgpack

log = logging.getLogger("tether.cloud.ray")
HEARTBEAT_S = 0.5
CLUSTER_PROBE_S = 1.0


class TailWorker:
    """One Ray actor: the served bundles' tails (and LLM sessions) on this worker's device.

    Plain class: :func:`_actor_class` wraps it with ``ray.remote`` at run time.
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        import torch

        from tether.cloud.bundles import ServedBundle
        from tether.cloud.config import CloudConfig
        from tether.cloud.core import CloudCore
        threads = settings["torch_threads"] or max(1, int(settings["worker_cpus"]))
        torch.set_num_threads(threads)
        self.device = _pick_device(settings["device"], settings["worker_gpus"])
        self.bundles = []
        for path in settings["bundles"]:
            bundle = ServedBundle.load(path)
            bundle.tail_factory = _on_device(bundle.tail_factory, self.device)
            self.bundles.append(bundle)
        config = CloudConfig(max_request_samples=settings["max_request_samples"],
                             max_message_bytes=settings["max_message_bytes"])
        self.limits = config.limits
        self.core = CloudCore(self.bundles, config) if self.bundles else None
        self.engine = None
        if settings.get("llm_checkpoint"):
            from tether.cloud.llm import LLMEngine, LLMEngineConfig
            from tether.core.config import from_mapping
            from tether.partitioner.llm import open_llm
            ckpt = open_llm(settings["llm_checkpoint"], settings.get("llm_tokenizer"))
            engine = from_mapping(LLMEngineConfig, settings.get("llm_engine", {}), "llm")
            self.engine = LLMEngine(ckpt, engine, model_id=settings["llm_model_id"])

    def ready(self) -> dict[str, Any]:
        """Build every tail now; who and where this worker is."""
        import ray
        for bundle in self.bundles:
            bundle.warm()
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "device": str(self.device), "fingerprints": [b.fingerprint for b in self.bundles]}

    def ping(self) -> int:
        return os.getpid()

    def run(self, messages: list[list[bytes]], meta: list[list[Any]]) -> tuple[list, list]:
        """Decode + tail of one batch: encoded replies and (inputs, rows, tail_s, busy_s)."""
        from tether.cloud.batch import Job
        from tether.core import protocol as P
        from tether.core.errors import BundleError
        start = time.perf_counter()
        msgs = [P.decode(frames, self.limits) for frames in messages]
        try:
            if self.core is None:
                raise BundleError("this worker serves no bundles")
            group = self.core._group_for(msgs[0])        # all of a batch share one group
        except Exception as exc:  # noqa: BLE001 - answered per request, like the front does
            replies = [P.Error.from_exception(m.request_id, exc) for m in msgs]
            return [_frames(r) for r in replies], [0, 0, 0.0, time.perf_counter() - start]
        jobs = [Job(m, start - age, None if left is None else start + left, None, 0)
                for m, (age, left) in zip(msgs, meta)]
        replies, batch = self.core._run_batch(group, jobs)
        stats = [batch.size, batch.samples, batch.tail_seconds] if batch else [0, 0, 0.0]
        return [_frames(r) for r in replies], [*stats, time.perf_counter() - start]

    def session(self, frames: list[bytes]) -> list[bytes]:
        """One PREFILL/DECODE/CLOSE against this worker's KV caches."""
        from tether.cloud.llm import _Job as LLMJob
        from tether.core import protocol as P
        msg = P.decode(frames, self.limits)
        if self.engine is None:
            reply = P.Error(msg.request_id, "session", "this worker serves no LLM sessions")
        else:
            reply = self.engine.run_jobs([LLMJob(msg, None)])[0]   # type: ignore[arg-type]
        return _frames(reply)


def _frames(msg: Any) -> list[bytes]:
    from tether.core import protocol as P
    return [bytes(f) for f in P.encode(msg)]


def _pick_device(wanted: str, gpus: float) -> Any:
    import torch
    from tether.core.errors import ConfigError
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("ray.device = 'cuda' but this worker sees no CUDA device")
    use_cuda = wanted == "cuda" or (wanted == "auto" and gpus > 0 and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def _on_device(factory: Any, device: Any) -> Any:
    """Wrap a tail factory so tails live on ``device`` and take CPU tensors."""
    if device.type == "cpu":
        return factory

    def build(split: str) -> Any:
        tail = factory(split)
        tail = tail.eval().to(device) if hasattr(tail, "to") else tail
        return lambda x: tail(x.to(device, non_blocking=True))
    return build


# ---- the dispatcher process -------------------------------------------------------------

class _Slot:
    def __init__(self, index: int) -> None:
        self.index, self.actor, self.live, self.epoch = index, None, False, 0
        self.pid, self.node, self.device = 0, "", ""
        self.inflight = 0
        self.replacing: asyncio.Task | None = None


class Dispatcher:
    """Drives ``tail_workers`` actors for the front connected on ``endpoint``."""

    def __init__(self, endpoint: str, settings: dict[str, Any]) -> None:
        self.endpoint, self.settings = endpoint, settings
        self.slots = [_Slot(i) for i in range(settings["tail_workers"])]
        self.restarts: list[float] = []
        self.sock: Any = None
        self._tasks: set[asyncio.Task] = set()

    async def serve(self) -> int:
        import ray
        import zmq
        import zmq.asyncio

        from tether.core.sockets import open_socket
        ctx = zmq.asyncio.Context()
        self.sock = open_socket(ctx, zmq.PAIR, connect=self.endpoint)
        address = _resolve(self.settings["address"])
        ray.init(address=address, namespace="tether",
                 log_to_driver=False, logging_level=logging.WARNING, include_dashboard=False)
        self.actor_class = ray.remote(max_restarts=0)(TailWorker)
        await asyncio.gather(*(self._place(s) for s in self.slots))
        await self._report()
        loops = [self._receive(), self._heartbeat(), self._probe_cluster(), self._watch_parent(),
                 self._ping_idle()]
        done, _ = await asyncio.wait([asyncio.ensure_future(c) for c in loops],
                                     return_when=asyncio.FIRST_COMPLETED)
        return next(iter(done)).result()

    async def _place(self, slot: _Slot) -> None:
        """Create the slot's actor and wait until its tails are built."""
        s = self.settings
        options: dict[str, Any] = {"num_cpus": s["worker_cpus"], "num_gpus": s["worker_gpus"],
                                   "scheduling_strategy": "SPREAD"}
        if s.get("resources"):          # custom node resources: one hundredth of a unit each
            options["resources"] = {name: 0.01 for name in s["resources"]}
        actor = self.actor_class.options(**options).remote(s)
        try:
            info = await asyncio.wait_for(_awaitable(actor.ready.remote()), s["start_timeout_s"])
        except Exception as exc:  # noqa: BLE001 - reported, the slot stays dead
            log.warning("worker %d did not start: %s", slot.index, _short(exc))
            _kill(actor)
            return
        slot.actor, slot.live, slot.epoch = actor, True, slot.epoch + 1
        slot.pid, slot.node, slot.device = info["pid"], info["node"], info["device"]

    async def _receive(self) -> int:
        while True:
            frames = await self.sock.recv_multipart(copy=True)
            head = msgpack.unpackb(frames[0], raw=False)
            if head["op"] == "stop":
                return 0
            task = asyncio.ensure_future(self._call(head, frames[1:]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _call(self, head: dict[str, Any], data: list[bytes]) -> None:
        slot = self.slots[head["slot"]]
        reply: dict[str, Any] = {"op": "done", "id": head["id"], "status": "lost", "counts": []}
        frames: list[bytes] = []
        if slot.live and slot.actor is not None:
            if head["op"] == "batch":
                messages, start = [], 0
                for n in head["counts"]:
                    messages.append(data[start:start + n])
                    start += n
                ref = slot.actor.run.remote(messages, head["meta"])
            else:
                ref = slot.actor.session.remote(data)
            slot.inflight += 1
            try:
                reply, frames = await self._outcome(slot, ref, reply, head["op"])
            finally:
                slot.inflight -= 1
        await self.sock.send_multipart([msgpack.packb(reply), *frames], copy=False)

    async def _outcome(self, slot: _Slot, ref: Any, reply: dict, op: str) -> tuple[dict, list]:
        import ray.exceptions as rex
        epoch = slot.epoch
        try:
            result = await asyncio.wait_for(_awaitable(ref), self.settings["batch_timeout_s"])
        except (rex.RayActorError, rex.ActorUnavailableError, asyncio.TimeoutError,
                rex.ObjectLostError, rex.OwnerDiedError) as exc:
            log.warning("worker %d lost: %s", slot.index, _short(exc))
            self._retire(slot, epoch)
            return reply, []
        except Exception as exc:  # noqa: BLE001 - a worker-side bug: ERROR, worker kept
            return {**reply, "status": "error", "message": _short(exc)}, []
        if op == "session":
            return {**reply, "status": "ok", "counts": [len(result)]}, result
        replies, stats = result
        flat = [f for r in replies for f in r]
        return {**reply, "status": "ok", "counts": [len(r) for r in replies], "stats": stats}, flat

    def _retire(self, slot: _Slot, epoch: int) -> None:
        if slot.epoch != epoch or not slot.live:
            return
        slot.live = False
        _kill(slot.actor)
        slot.actor = None
        asyncio.ensure_future(self._report())
        if slot.replacing is None or slot.replacing.done():
            slot.replacing = asyncio.ensure_future(self._replace(slot))

    async def _replace(self, slot: _Slot) -> None:
        delay = 0.2
        while not slot.live:
            now = time.monotonic()
            self.restarts = [t for t in self.restarts if now - t < 60]
            if len(self.restarts) < self.settings["max_restarts_per_minute"]:
                self.restarts.append(now)
                await self._place(slot)
                await self._report()
            if not slot.live:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _report(self) -> None:
        head = {"op": "workers", "restarts": len(self.restarts),
                "slots": [{"slot": s.index, "live": s.live, "epoch": s.epoch, "pid": s.pid,
                           "node": s.node, "device": s.device} for s in self.slots]}
        await self.sock.send_multipart([msgpack.packb(head)])

    async def _heartbeat(self) -> int:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            await self._report()

    async def _probe_cluster(self) -> int:
        """Exit (the front starts a fresh driver) once the cluster stops answering."""
        import ray
        failures = 0
        while True:
            await asyncio.sleep(CLUSTER_PROBE_S)
            try:
                await asyncio.wait_for(asyncio.to_thread(ray.nodes), 3.0)
                failures = 0
            except Exception as exc:  # noqa: BLE001 - any failure counts
                failures += 1
                log.warning("Ray cluster probe failed (%d): %s", failures, _short(exc))
            if failures >= 2:
                return 3


    async def _ping_idle(self) -> int:
        """Find workers that died while idle (no batch would notice): ping them each second."""
        import ray.exceptions as rex
        while True:
            await asyncio.sleep(1.0)
            for slot in self.slots:
                if not (slot.live and slot.inflight == 0 and slot.actor is not None):
                    continue
                epoch = slot.epoch
                try:
                    await asyncio.wait_for(_awaitable(slot.actor.ping.remote()), 10.0)
                except (rex.RayActorError, rex.ActorUnavailableError, asyncio.TimeoutError) as exc:
                    log.warning("worker %d lost while idle: %s", slot.index, _short(exc))
                    self._retire(slot, epoch)

    async def _watch_parent(self) -> int:
        """Exit when the front is gone (killed): the actors die with their driver."""
        parent = os.getppid()
        while os.getppid() == parent:
            await asyncio.sleep(1.0)
        return 4


def _resolve(address: str) -> str:
    """``auto``: RAY_ADDRESS, else a cluster running on this machine, else a new local one.

    Ray's own ``ray.init()`` trusts /tmp/ray/ray_current_cluster even when that cluster is
    gone (it then fails); only an address with a live GCS process here is used.
    """
    if address != "auto" or os.environ.get("RAY_ADDRESS"):
        return address if address != "auto" else os.environ["RAY_ADDRESS"]
    from ray._private import services, utils
    running = set(services.find_gcs_addresses())
    recorded = utils.read_ray_address(None)
    if recorded in running:
        return recorded
    return next(iter(sorted(running)), "local")


def _awaitable(ref: Any) -> Any:
    return asyncio.wrap_future(ref.future())


def _kill(actor: Any) -> None:
    if actor is None:
        return
    try:
        import ray
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
        pass


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def dispatcher_main(endpoint: str, settings: dict[str, Any]) -> int:
    """Entry of ``tether cloud-ray-dispatcher`` (started by the front; not for users)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s ray-dispatcher %(message)s")
    code = asyncio.run(Dispatcher(endpoint, settings).serve())
    if code == 0:       # asked to stop, cluster healthy: release actors (and a local cluster)
        import ray
        ray.shutdown()
    os._exit(code)      # never wait for ray's atexit handlers against a dead cluster
