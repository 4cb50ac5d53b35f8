"""The reconcile loop's parts: an LLMService -> the Kubernetes objects that serve it.

- `manifests`: pure functions from a resolved spec to Deployments, Services, router objects, PDBs.
- `reconcile`: one reconcile of one service: resolve, render, apply, delete what is no longer
  planned, report status.
- `status`: status conditions and the status patch.
- `kube`: the thin wrapper over the Kubernetes client the operator talks through.
- `sweep`: the one operator-wide loop each that runs the autoscaler and the rollouts over every
  LLMService, with bounded concurrency (instead of a kopf daemon per service).
- `events`: Kubernetes events from those loops, which run outside kopf's handlers.
- `leader`: leader election on a Lease: of several operator replicas only the holder acts.
"""
