"""ONNX export of heads (dynamic batch) and the ONNX Runtime wrapper the edge runs them with."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tether.core.errors import BundleError, InputShapeError, ModelError
from tether.partitioner.exported import export_onnx_dynamo, is_exported

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "output"


def export_onnx(module: nn.Module, example: torch.Tensor, path: str | Path,
                output_names: list[str] | None = None) -> Path:
    """Export ``module`` to ONNX at ``path`` with a dynamic batch dimension on every tensor."""
    outputs = output_names or [OUTPUT_NAME]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_exported(module):        # ATen graph from torch.export: keep the batch symbolic
        try:
            export_onnx_dynamo(module, example, path, outputs, INPUT_NAME, OPSET)
        except Exception as exc:
            raise ModelError(f"cannot export {type(module).__name__} to ONNX: {exc}") from exc
        return path
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():  # grad on: keeps MHA off its non-exportable fast path
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module.eval(), (example,), buffer, dynamo=False, opset_version=OPSET,
                input_names=[INPUT_NAME], output_names=outputs,
                dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *outputs]})
    except Exception as exc:  # the exporter raises many types for unsupported ops
        raise ModelError(f"cannot export {type(module).__name__} to ONNX: {exc}") from exc
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)
    return path


class OnnxModule:
    """ONNX Runtime CPU session, one input and one output: ``__call__(ndarray) -> ndarray``."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise BundleError(f"ONNX file {self.path} is missing: re-export the bundle with "
                              f"`tether partition`")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise BundleError(f"ONNX Runtime cannot load {self.path}: {exc}") from exc
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name, self.output_name = inp.name, out.name
        self.input_shape = tuple(d if isinstance(d, int) else None for d in inp.shape)
        self.input_dtype = np.int64 if inp.type == "tensor(int64)" else np.float32
        self.output_shape = tuple(d if isinstance(d, int) else None for d in out.shape)
        self.threads = int(threads)

    def __call__(self, x: np.ndarray | torch.Tensor, run_options: Any = None) -> np.ndarray:
        """The output for ``x``; ``run_options``: an ``onnxruntime.RunOptions`` (its
        ``terminate`` flag, set from another thread, stops the run with a ModelError)."""
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        self._check(x)
        try:
            return self.session.run([self.output_name], {self.input_name: x}, run_options)[0]
        except Exception as exc:
            raise ModelError(f"ONNX Runtime failed on {self.path.name}: {exc}") from exc

    def _check(self, x: np.ndarray) -> None:
        expected = self.input_shape
        ok = x.ndim == len(expected) and all(e is None or e == d for e, d in zip(expected, x.shape))
        if not ok:
            shown = tuple("N" if e is None else e for e in expected)
            raise InputShapeError(f"{self.path.name} expects input of shape {shown}, "
                                  f"got {tuple(x.shape)}")

    def __repr__(self) -> str:
        return f"OnnxModule({str(self.path)!r}, threads={self.threads})"


def check_onnx_matches(onnx_path: Path, module: nn.Module, example: torch.Tensor,
                       rtol: float = 1e-4, atol: float = 1e-4) -> None:
    """Raise BundleError unless the ONNX file reproduces ``module`` on ``example`` (and batch 2)."""
    session = OnnxModule(onnx_path)
    batch = torch.cat([example[:1], example[:1].flip(-1)], 0)
    for x in (example, batch):
        with torch.no_grad():
            want = module(x)
        got = torch.from_numpy(session(x.numpy()))
        scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
        try:
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol * scale)
        except AssertionError as exc:
            raise BundleError(f"ONNX export {onnx_path.name} does not match torch on "
                              f"batch {x.shape[0]}: {str(exc).splitlines()[0:3]}") from exc
