"""`kvpilot serve`: the OpenAI-compatible HTTP server around LLMEngine.

Modules: `api_server` (the FastAPI app, probes, /metrics and /v1/models, `run_server` with a
draining shutdown), `serving_completion` (/v1/completions) and `serving_chat`
(/v1/chat/completions), on `serving` (what the endpoints share: parsing, admission, collecting a
stream), `guard` (what a request passes first: the API key, the body's size limit, where its
priority may come from), `errors` (the one OpenAI-shaped error path), `protocol` (request and
response bodies), `async_engine` (the engine loop on its own thread), `metrics` (Prometheus),
`logs` (JSON logs).

Imported only by the serve command, so the engine library itself never needs FastAPI; `logs` is
torch-free, for the router.
"""
