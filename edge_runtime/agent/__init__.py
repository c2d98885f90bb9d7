"""The device agent: `comigs edge run` joins the coordinator's rounds and trains within a budget.

Modules, one concept each:

- `state`: the durable, power-loss-safe state directory (generation files + a manifest written last)
- `backends`: the training backends behind one interface (eager PyTorch, ExecuTorch training program)
- `loop`: the round loop (register, task, download, train, upload the generalist delta, report)
- `cli`: `comigs edge run` / `comigs edge plan` / `comigs edge demo`
- `demo`: the four-device demo on loopback
- `certificate`: the self-signed loopback certificate the demo, the sync tests and the sync benchmark use
"""
