"""The LLMService API: what users write and what the other parts agree on.

- `types`: the pydantic models of LLMService and ServingPolicy (spec and status), the one source
  of truth for the CRDs.
- `crds`: CustomResourceDefinitions and docs/crd-reference.md generated from `types`.
- `policies`: the shipped ServingPolicy presets, and `resolve`: an LLMService body plus its
  policy -> the effective spec, used by the reconcile and the autoscaler.
- `names`: labels, selectors and derived object names shared by every part.
"""
