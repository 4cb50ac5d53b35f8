"""kvpilot's control plane: the LLMService API, the kopf operator, the SLO autoscaler, rollouts
and the router. Imports no torch, and from the engine only its torch-free modules
(`kvpilot_engine.contracts`, the log setup): the operator image carries no torch.

- `api/`: the LLMService and ServingPolicy models, CRD generation, presets and `resolve`, and
  the labels and names every part shares.
- `controller/`: the reconcile: manifests, status, the Kubernetes client wrapper.
- `autoscaler/`: the pure scaling decision, its loop, and the offline simulator.
- `rollout/`: canary and shadow rollouts (plan, the pure step, the loop).
- `observability/`: the Prometheus queries the loops read, the SLO series the operator exports,
  and the chart's rules and dashboard.
- `router/`: `kvpilot router`, the streaming proxy in front of each LLMService.
- `local/`: development tooling for one machine (control plane, Prometheus, node agent,
  `kvpilot up`); not used in a cluster.
- `handlers.py` (the kopf handlers), `cli.py` (the `kvpilot` subcommands), `packaged.py` (the
  data files the package ships).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kvpilot")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
