"""Development tooling: the whole system on one machine, without a real cluster. Not used by the
operator in a cluster.

- `cluster`: a throwaway control plane (etcd, kube-apiserver, controller-manager, scheduler) on
  loopback; `build_kube.sh` builds its binaries once into ~/.cache/kvpilot.
- `pki`: its certificates and kubeconfigs.
- `prometheus`: Debian's Prometheus, discovering pods like a `kubernetes-pods` job.
- `nodeagent`: a stand-in for a kubelet that runs pods' commands as local processes.
- `stack`: `kvpilot up` / `kvpilot down`: all of the above plus the operator.
- `bench`: `kvpilot bench operator`, reconcile throughput on a local control plane.
- `procs`: process, port and scratch-space helpers the others share.
"""
