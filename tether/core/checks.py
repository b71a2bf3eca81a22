"""Input checks shared by the edge and the cloud (numpy arrays and torch tensors alike)."""

from __future__ import annotations

from typing import Any

import numpy as np

from tether.core.errors import NonFiniteInputError


def require_finite(x: Any, what: str = "the input") -> None:
    """Raise :class:`NonFiniteInputError` when a floating ``x`` holds NaN or +-Inf.

    A model fed NaN answers with confident garbage (class 0); tether refuses instead. Integer
    and bool tensors pass untouched. One pass over the data, no copy for float32/float16.
    """
    if not isinstance(x, np.ndarray):
        import torch
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return
        if x.dtype not in (torch.float32, torch.float16, torch.float64) \
                or x.device.type != "cpu" or x.requires_grad:
            if bool(torch.isfinite(x).all()):
                return
            bad = int(x.numel() - torch.isfinite(x).sum())
            raise NonFiniteInputError(_message(what, bad, _size(x)))
        x = x.numpy()           # a view: numpy's check costs a fraction of torch's dispatch
    if x.dtype.kind != "f" or bool(np.isfinite(x).all()):
        return
    bad = int(x.size - np.count_nonzero(np.isfinite(x)))
    raise NonFiniteInputError(_message(what, bad, _size(x)))


def _message(what: str, bad: int, size: int) -> str:
    return (f"{what} holds {bad} NaN/Inf value(s) of {size}: refusing to answer from "
            "non-finite data; check the sensor/preprocessing")


def _size(x: Any) -> int:
    return int(x.size) if isinstance(x, np.ndarray) else int(x.numel())
