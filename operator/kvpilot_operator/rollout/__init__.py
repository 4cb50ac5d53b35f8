"""Canary and shadow rollouts.

- `plan`: which revisions serve now (stable, canary and its weight), for the renderer.
- `canary`: the pure step: judge a canary against stable, advance status.canary, summarise the
  shadow's health.
- `controller`: the loop that reads the routers' metrics and moves status.canary on.
"""
