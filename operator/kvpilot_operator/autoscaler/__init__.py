"""The SLO autoscaler.

- `decision`: `decide`, the pure scaling decision (no I/O, no clock) over an `Observation`.
- `deadline`: `deadline_replicas`, as pure: the replicas a Batch API backlog needs to finish
  before its nearest completion window closes; the loop raises the SLO decision to it.
- `loop`: one evaluation of a service around it (observe Prometheus, decide, write the scale
  subresource, record status and metrics), and each service's state between evaluations; the
  operator runs it for every service in one loop (`controller.sweep`).
- `simulate`: the same decision against a simulated engine pool and a load trace
  (`kvpilot autoscale simulate`).
"""
