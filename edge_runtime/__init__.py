"""comigs-edge device side: the CoMiGS model, its local trainer and (later) the device agent.

Importing this package is cheap on purpose (no torch): the `comigs` CLI lives here and must
start fast for subcommands such as `comigs sync serve` that never touch a model.
"""

__version__ = "0.1.0"
