"""Edge compute: ONNX heads, the whole model, early exits and codec encoding for one bundle.

Everything here is synchronous and CPU-bound; the agent calls it from worker threads so the
event loop never blocks. Sessions and codecs are built once at start (bad bundles fail fast).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tether.core import protocol as P
from tether.core.bundle import Manifest
from tether.core.checks import require_finite
from tether.core.errors import BundleError, InputShapeError, SplitError, TetherError
from tether.core.types import CostTable

log = logging.getLogger(__name__)

INPUT = "input"   # the "split point" of a full offload


@dataclass(frozen=True)
class ExitAnswer:
    """An early exit's output for one sample: logits and whether it is confident enough."""

    logits: np.ndarray
    confidence: float
    confident: bool


class Stop:
    """Asks one whole-model run to stop early (ONNX Runtime's terminate flag): the agent
    races a local answer against a late reply and stops the loser's compute."""

    def __init__(self) -> None:
        import onnxruntime as ort
        self.run_options = ort.RunOptions()
        self.requested = False

    def __call__(self) -> None:
        self.requested = True
        self.run_options.terminate = True


class StoppedError(Exception):
    """Internal to the edge: a run stopped by its :class:`Stop` (its answer is no longer
    wanted); never reaches a caller of the agent."""


class EdgeCompute:
    """Runs one bundle's edge side. Thread-safe: ONNX sessions and codecs are shared."""

    def __init__(self, bundle_dir: str | Path, onnx_threads: int = 1, warm: bool = True) -> None:
        from tether.partitioner import BundleModel, OnnxModule   # heavy: torch, onnxruntime

        self.bundle_dir = Path(bundle_dir)
        self._bundle = BundleModel.load(self.bundle_dir)
        self.manifest: Manifest = self._bundle.manifest
        self._onnx = OnnxModule
        self._threads = onnx_threads
        self.full_model = OnnxModule(str(self._bundle.full_onnx_path()), threads=onnx_threads)
        self.heads: dict[str, Any] = {}
        for entry in self.manifest.split_points:
            if entry.head:
                self.heads[entry.name] = OnnxModule(str(self._bundle.head_onnx_path(entry.name)),
                                                    threads=onnx_threads)
        self._exits = {e.split: e for e in self.manifest.exits}
        self._exit_modules: dict[str, Any] = {}
        self._codecs: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self.costs = self._load_costs()
        if warm:
            self.warm()
        log.info("edge bundle %s (%s, fingerprint %s): heads %s, exits %s", self.bundle_dir,
                 self.manifest.model_id, self.fingerprint[:12], sorted(self.heads),
                 sorted(self._exits))

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    def warm(self) -> None:
        """Run the whole model and every head once on a dummy input (ONNX Runtime allocates
        and picks kernels on the first run), and build every learned codec and exit of the
        manifest (loading them takes seconds of CPU: far too long for a request on a
        throttled edge), so the first request is not cold."""
        x = np.zeros((1, *self.manifest.input.shape[1:]), dtype=self.manifest.input.dtype)
        for module in (self.full_model, *self.heads.values()):
            module(x)
        for entry in self.manifest.codecs:
            self.codec(entry.split, entry.codec)
        for split in self._exits:
            self._exit_module(split)
        self._warm_encoders()

    def _warm_encoders(self) -> None:
        """Encode once with every codec of the cost table the edge can run: an image
        codec's first use loads its library plugin (WebP's took 0.75 s behind a 0.11-core
        quota, three requests queued behind it), a learned codec's its entropy coder."""
        if self.costs is None or self.manifest.input.dtype.startswith("int"):
            return
        shape = (1, *self.manifest.input.shape[1:])
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        features = {INPUT: x}
        for entry in self.costs.codecs:
            split = entry.split
            if split != INPUT and split not in self.heads:
                continue
            try:
                if split not in features:
                    features[split] = self.head(split, x)
                inp = x if self.replaces_head(split, entry.codec) else features[split]
                self.encode(split, entry.codec, inp)
            except TetherError as exc:   # answered as a fallback if a policy ever picks it
                log.warning("codec %s at %s cannot encode on this edge: %s",
                            entry.codec, split, exc)

    def _load_costs(self) -> CostTable | None:
        try:
            return self._bundle.cost_table()
        except (TetherError, OSError) as exc:
            log.warning("bundle %s has no usable cost table (%s)", self.bundle_dir, exc)
            return None

    def bundle_info(self) -> P.BundleInfo:
        """What this edge serves (its HELLO to the cloud, its READY to applications)."""
        m = self.manifest
        return P.BundleInfo(m.model_id, m.fingerprint, tuple(sorted(self.heads)), (),
                            P.TensorDesc(tuple(m.input.shape), m.input.dtype))

    # ---- input -------------------------------------------------------------------------

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """Validate and convert an application's image(s) to float32 NCHW in [0, 1].

        Accepts uint8 HWC / NHWC (as decoded from image files) or float NCHW / CHW; bundles
        whose input is integer (token ids of a text model) take integer ``[N, L]`` / ``[L]``.
        """
        spec = self.manifest.input.shape[1:]   # (C, H, W)
        if not isinstance(x, np.ndarray):
            raise InputShapeError(f"input must be a numpy array, got {type(x).__name__}")
        if self.manifest.input.dtype.startswith("int"):
            return self._prepare_ids(x, tuple(spec))
        if x.dtype == np.uint8:
            if x.ndim == 3:
                x = x[None]
            if x.ndim != 4 or x.shape[1:] != (spec[1], spec[2], spec[0]):
                raise InputShapeError(f"uint8 image must be HWC {(spec[1], spec[2], spec[0])}, "
                                      f"got {x.shape}: resize it to the bundle's input first")
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
        if x.dtype not in (np.float32, np.float16, np.float64):
            raise InputShapeError(f"input dtype {x.dtype} unsupported; send uint8 HWC or float NCHW")
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(spec):
            raise InputShapeError(f"float input must be NCHW with CHW={tuple(spec)}, got {x.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        require_finite(x, "the image")   # NaN would come back as a confident class 0
        return x

    def _prepare_ids(self, x: np.ndarray, spec: tuple[int, ...]) -> np.ndarray:
        if x.dtype.kind not in "iu":
            raise InputShapeError(f"this bundle takes integer token ids, got dtype {x.dtype}")
        x = x[None] if x.ndim == len(spec) else x
        if tuple(x.shape[1:]) != spec:
            raise InputShapeError(f"token ids must be [N, {', '.join(map(str, spec))}], "
                                  f"got {x.shape}")
        return np.ascontiguousarray(x, dtype=self.manifest.input.dtype)

    # ---- models ------------------------------------------------------------------------

    def full(self, x: np.ndarray, stop: Stop | None = None) -> np.ndarray:
        """The whole model on the edge: logits. ``stop`` may end the run early
        (:class:`StoppedError`), before it starts or while it runs."""
        if stop is None:
            return self.full_model(x)
        if stop.requested:
            raise StoppedError("stopped before it started")
        try:
            return self.full_model(x, stop.run_options)
        except TetherError as exc:
            if stop.requested:
                raise StoppedError("stopped while running") from exc
            raise

    def head(self, split: str, x: np.ndarray) -> np.ndarray:
        """The head up to ``split``: the crossing tensor."""
        if split == INPUT:
            return x
        module = self.heads.get(split)
        if module is None:
            self.manifest.split(split)   # raises SplitError listing the valid ones
            raise SplitError(f"split point {split!r} has no exported ONNX head in this bundle; "
                             f"exported: {sorted(self.heads)} (re-export with --splits)")
        return module(x)

    def has_exit(self, split: str) -> bool:
        return split in self._exits

    @property
    def exit_splits(self) -> list[str]:
        return sorted(self._exits)

    def early_exit(self, split: str, features: np.ndarray) -> ExitAnswer:
        """Run the exit head at ``split`` on the crossing tensor (batch 1)."""
        if split not in self._exits:
            raise SplitError(f"no early exit at {split!r}; exits: {self.exit_splits}")
        decision = self._exit_module(split)(features)
        return ExitAnswer(np.asarray(decision.logits, dtype=np.float32),
                          float(decision.confidence[0]), bool(decision.take[0]))

    def _exit_module(self, split: str) -> Any:
        with self._lock:
            module = self._exit_modules.get(split)
            if module is None:
                module = self._build_exit(split)
                self._exit_modules[split] = module
            return module

    def _build_exit(self, split: str) -> Any:
        """K's calibrated exit (tether.codecs.load_exit), or a bare ONNX exit head."""
        entry = self._exits[split]
        if entry.path.endswith(".onnx"):
            onnx = self._onnx(str(self.bundle_dir / entry.path), threads=self._threads)
            return _OnnxExit(onnx, entry.metric, entry.threshold)
        from tether.codecs import load_exit
        return load_exit(self.bundle_dir, self.manifest, split)

    # ---- codecs ------------------------------------------------------------------------

    def codec(self, split: str, codec_id: str) -> Any:
        """The codec ``codec_id`` for ``split`` (built once, cached)."""
        key = (split, codec_id)
        with self._lock:
            codec = self._codecs.get(key)
            if codec is None:
                from tether.codecs import make_codec
                codec = make_codec(codec_id, bundle_dir=self.bundle_dir, manifest=self.manifest,
                                   split=split)
                self._codecs[key] = codec
            return codec

    def replaces_head(self, split: str, codec_id: str) -> bool:
        """True for student codecs: they encode the model input, the head is not run."""
        if split == INPUT:
            return False
        return bool(getattr(self.codec(split, codec_id), "replaces_head", False))

    def encode(self, split: str, codec_id: str, features: np.ndarray) -> Any:
        """Encode the crossing tensor: an ``EncodedTensor(header, payload)``."""
        with torch.inference_mode():
            return self.codec(split, codec_id).encode(torch.from_numpy(np.ascontiguousarray(features)))

    # ---- estimates for the agent -------------------------------------------------------

    def local_seconds(self) -> float:
        """Expected seconds of a local whole-model answer (cost table, else a measurement)."""
        if self.costs is not None and self.costs.edge_full_seconds > 0:
            return float(self.costs.edge_full_seconds)
        import time
        x = np.zeros((1, *self.manifest.input.shape[1:]), dtype=self.manifest.input.dtype)
        self.full(x)
        t0 = time.perf_counter()
        self.full(x)
        return time.perf_counter() - t0

    def default_split(self) -> str:
        """The exported split with the fewest crossing bytes (the `auto` action)."""
        exported = [e for e in self.manifest.split_points if e.name in self.heads]
        if not exported:
            raise BundleError(f"bundle {self.bundle_dir} exports no ONNX heads; set action = "
                              "'local' or 'offload:fp32', or re-export with --splits")
        return min(exported, key=lambda e: (e.bytes, e.index)).name


@dataclass(frozen=True)
class _Decision:
    logits: np.ndarray
    confidence: np.ndarray
    take: np.ndarray


class _OnnxExit:
    """An exit head exported to ONNX, with the manifest's metric and threshold."""

    def __init__(self, module: Any, metric: str, threshold: float) -> None:
        if metric not in ("max_softmax", "entropy"):
            raise BundleError(f"unknown exit metric {metric!r}; use max_softmax or entropy")
        self.module, self.metric, self.threshold = module, metric, threshold

    def __call__(self, features: np.ndarray) -> _Decision:
        logits = np.asarray(self.module(features), dtype=np.float32)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        p = shifted / shifted.sum(axis=1, keepdims=True)
        if self.metric == "max_softmax":
            conf = p.max(axis=1)
            return _Decision(logits, conf, conf >= self.threshold)
        conf = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1)
        return _Decision(logits, conf, conf <= self.threshold)
