"""The SLO autoscaler.

- `decision`: `decide`, the pure scaling decision (no I/O, no clock) over an `Observation`.
- `loop`: the operator's loop around it: observe Prometheus, decide, write the scale
  subresource, record status and metrics.
- `simulate`: the same decision against a simulated engine pool and a load trace
  (`kvpilot autoscale simulate`).
"""
