"""Helpers shared by the test trees (tests/ and e2e/). Test modules import from here, never from
each other.

- `kube`: drive `kvpilot operator` on a local control plane (kubectl, waits, users).
- `helm`: a pinned Helm 3 for the chart tests, and `helm template` helpers.
- `engine`: run `kvpilot serve` as a process, wait for it, read its /metrics.
- `router`: run `kvpilot router` in front of engines, and failing upstreams.
- `oracle`: Hugging Face transformers as the engine's reference.
- `memkube`: an in-memory stand-in for the operator's Kubernetes wrapper (reconcile unit tests).
"""
