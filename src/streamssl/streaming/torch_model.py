"""A PyTorch model as the streaming core steps it: numpy in and out.

The core (:mod:`streamssl.streaming.engine`) is torch-free, so that an exported model runs without
PyTorch; it steps a PyTorch model (:class:`~streamssl.asr.ctc.CTCModel`, a bare
:class:`~streamssl.Encoder`) through :class:`TorchStepModel`, which it builds itself. Inputs become
tensors without a copy (``torch.from_numpy``), every call runs under ``torch.inference_mode``, and
outputs go back as numpy views of the result tensors. States stay the model's own objects.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

# Model dtypes numpy holds as they are; others (bfloat16) cross as float32.
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _to_numpy(tensor: Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    return (tensor if tensor.dtype in _NUMPY_DTYPES or not tensor.is_floating_point() else tensor.float()).numpy()


class TorchStepModel:
    """``model``'s streaming API with numpy arrays: ``init_state``, ``stack_states``, ``step_window``,
    ``flush_window`` (the state's own ``select`` works as it is). ``dtype`` is the numpy dtype of the
    input it takes (the model's, or float32)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.torch_dtype: torch.dtype = getattr(model, "dtype", torch.float32)
        self.dtype = np.dtype(_NUMPY_DTYPES.get(self.torch_dtype, np.float32))
        self.device: torch.device = getattr(model, "device", torch.device("cpu"))

    def init_state(self, batch_size: int) -> Any:
        with torch.inference_mode():
            return self.model.init_state(batch_size)

    def stack_states(self, states: Sequence[Any]) -> Any:
        with torch.inference_mode():
            return self.model.stack_states(states)

    def step_window(self, chunk: np.ndarray, state: Any, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, Any]:
        """``chunk`` ``(B, n[, dim])`` right-aligned with ``counts`` ``(B,)`` int64 real samples ->
        outputs ``(B, m, ...)`` with row ``b``'s ``emitted[b]`` real frames first, ``emitted`` ``(B,)``,
        and the next state."""
        with torch.inference_mode():
            outputs, emitted, state = self.model.step_window(
                torch.from_numpy(chunk).to(self.device, self.torch_dtype), state,
                torch.from_numpy(counts).to(self.device))
        return _to_numpy(outputs), _to_numpy(emitted), state

    def flush_window(self, state: Any) -> tuple[np.ndarray, np.ndarray, Any]:
        """End every stream: outputs as :meth:`step_window`'s."""
        with torch.inference_mode():
            outputs, emitted, state = self.model.flush_window(state)
        return _to_numpy(outputs), _to_numpy(emitted), state
