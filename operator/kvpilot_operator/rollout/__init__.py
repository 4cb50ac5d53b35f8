"""Canary and shadow rollouts.

- `plan`: which revisions serve now (stable, canary and its weight), for the renderer.
- `canary`: the pure step: judge a canary against stable, advance status.canary, summarise the
  shadow's health.
- `adapters`: the same for a LoRA adapter's canary (a version beside the current one on the
  same engines, by share of the adapter's requests): plan and step, pure.
- `controller`: one evaluation of a service: read the routers' metrics, move status.canary on;
  the operator runs it for every service with a rollout in one loop (`controller.sweep`).
"""
