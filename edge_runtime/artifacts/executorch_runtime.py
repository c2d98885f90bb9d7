"""The ExecuTorch C++ runtime, imported without the ahead-of-time compiler.

executorch's Python entry points (`executorch.runtime`, `executorch.extension.pybindings.portable_lib`,
`executorch.extension.training`) import `executorch.exir` just to emit an "experimental API" warning,
and with it torchao, sympy and ~1,800 other modules: ~130 MB of resident memory in a process that
only runs a program. That is a tenth of what a SmolLM2 training step needs, on devices that budget
every megabyte. The runtime itself is the `_C` extension (0.5 MB, linked against libtorch, so torch is
imported first); this module loads it alone and implements the little the Python wrappers add: the
training program's metadata methods that split its outputs into loss, gradients and parameters (the
convention of `executorch.extension.training.TrainingModule`, which the export writes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

GRADIENTS_INDEX = "__et_training_gradients_index_"
PARAMETERS_INDEX = "__et_training_parameters_index_"
FQNS = "__et_training_fqn_"


def runtime() -> Any:
    """executorch's `_C` pybindings module (programs, methods, threadpool), without `executorch.exir`."""
    from executorch.extension.pybindings import _C

    return _C


def set_threads(threads: int) -> None:
    """Size the threadpool XNNPACK delegates run on (it is shared by every program in the process)."""
    runtime()._unsafe_reset_threadpool(threads)


class InferenceProgram:
    """A loaded program; `run` calls its default method (or another). Outputs are copies, so a later
    call cannot overwrite them."""

    def __init__(self, program: str | Path, data: str | Path | None, method: str = "forward") -> None:
        _C = runtime()
        self._program = _C._load_program(str(program), enable_etdump=False, debug_buffer_size=0,
                                         program_verification=_C.Verification.InternalConsistency,
                                         data_path=str(data) if data is not None else None)
        self.method_names = {self._program.get_method_name(i) for i in range(self._program.num_methods())}
        self._methods: dict[str, Any] = {}
        self.name = method

    def run(self, inputs: list[Any], method: str | None = None) -> list[Any]:
        name = method or self.name
        if name not in self._methods:
            self._methods[name] = self._program.load_method(name)
        return list(self._methods[name](inputs))


@dataclass
class TrainingStep:
    """What one call of a joint forward/backward method returns, split by the program's metadata."""

    loss: float  # the first user output; the others (the logits) are not copied out: 25 MB for SmolLM2
    gradients: dict[str, torch.Tensor]  # by FQN, cloned: the next call reuses the program's buffers
    parameters: dict[str, torch.Tensor]  # by FQN, aliasing the program's own weights (an optimiser
    # that updates them in place changes what the next call computes)


class TrainingProgram:
    """A loaded joint forward/backward program (`executorch.extension.training`'s output layout)."""

    def __init__(self, program: str | Path, data: str | Path | None) -> None:
        self._module = runtime()._load_for_executorch(str(program), data_path=str(data) if data is not None else None)
        self.method_names = set(self._module.method_names())
        self._layouts: dict[str, tuple[int, int, list[str]]] = {}

    def run_method(self, name: str, inputs: tuple[Any, ...] = ()) -> list[Any]:
        return list(self._module.run_method(name, inputs))

    def _layout(self, method: str) -> tuple[int, int, list[str]]:
        """Where `method`'s gradients and parameters start in its outputs, and their FQNs (constants
        of the program, read once)."""
        if method not in self._layouts:
            self._layouts[method] = (self.run_method(GRADIENTS_INDEX + method)[0],
                                     self.run_method(PARAMETERS_INDEX + method)[0],
                                     self.run_method(FQNS + method))
        return self._layouts[method]

    def forward_backward(self, method: str, inputs: tuple[Any, ...]) -> TrainingStep:
        grads_at, params_at, fqns = self._layout(method)
        out = self._module.run_method(method, inputs, clone_outputs=False)
        return TrainingStep(loss=float(out[0]),
                            gradients={n: g.clone() for n, g in zip(fqns, out[grads_at:params_at], strict=True)},
                            parameters=dict(zip(fqns, out[params_at:], strict=True)))
