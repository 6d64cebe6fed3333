"""The run engine every training method plugs into.

`loop.run_method(method, settings)` runs a `method.Method` (its data, step and hooks)
with `settings.RunSettings`: run directory, model and its DDP/FSDP wrapping, optimizer
and schedule, checkpoints and exact resume, SIGINT/SIGTERM, metrics and progress.
Modules are imported by name (this package's __init__ stays light).
"""
