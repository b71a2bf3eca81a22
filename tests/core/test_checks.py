"""tether.core.checks.require_finite: the shared NaN/Inf refusal (edge and cloud)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tether.core.checks import require_finite
from tether.core.errors import InputShapeError, NonFiniteInputError


@pytest.mark.parametrize("make", [np.array, torch.tensor])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_are_refused_with_a_typed_error(make, bad):
    x = make([[0.5, bad, 1.0]])
    with pytest.raises(NonFiniteInputError, match="1 NaN/Inf value") as info:
        require_finite(x, "the image")
    assert isinstance(info.value, InputShapeError) and info.value.code == "non_finite"
    assert "the image" in str(info.value)


def test_finite_and_integer_tensors_pass():
    require_finite(np.ones((2, 3), dtype=np.float16))
    require_finite(torch.ones(2, 3, dtype=torch.bfloat16))
    require_finite(np.array([1, 2], dtype=np.int64))
    require_finite(torch.tensor([True]))
