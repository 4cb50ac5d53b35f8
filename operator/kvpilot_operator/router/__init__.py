"""`kvpilot router`: the OpenAI-compatible streaming reverse proxy in front of one LLMService.

It picks a revision by the canary weights (smooth weighted round robin), an endpoint within it by
prompt-prefix affinity with bounded loads (so the engines' prefix caches hit) or by least
outstanding requests, forwards bytes as they come, mirrors a sample to a shadow revision and
compares the answers. Routes come from a JSON file (`--config`) or, in a cluster, from the
ConfigMap `<service>-router` and the service's ready pods.

Modules: `config` (the route JSON), `table` (routing state and choices), `adapters` (LoRA
adapters: which engines hold which version, and the version a request gets), `admission` (bounded
in-flight and queue), `sse` (events and generated text), `discovery` (sources and load scraping),
`metrics`, `shadow`, `proxy` (the ASGI app), `server` (`run_router`), `bench`, and `batch`
(OpenAI's Batch API, run through the proxy at low priority; a package of its own).
No torch here, and nothing from the engine but its torch-free `contracts` (the histogram
buckets), `server.logs` (the one structlog setup) and `batch.protocol` (the batch file format).
"""
