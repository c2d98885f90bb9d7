"""comigs-edge device side: the CoMiGS model, its local trainer and the device agent.

Importing this package is cheap on purpose (no torch): the `comigs` CLI lives here and must
start fast for subcommands such as `comigs sync serve` that never touch a model.
"""

import logging as _logging

__version__ = "0.1.0"

# executorch depends on torchao, which transformers imports whenever it is installed; torchao then
# warns on every start that its CUDA-only kernels (mxfp8, cutlass) cannot load on a CPU machine and
# registers enums that torch's pytree calls deprecated. Neither concerns us; keep real errors.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
