"""OpenAI's Batch API in front of one LLMService: upload a JSONL file, create a batch, collect the
results later, with the official `openai` client unchanged.

Modules: `store` (files, batch records and results in a directory: a PersistentVolumeClaim in a
cluster, so a restarted router finds every batch where it left it), `objects` (the File and
Batch objects as OpenAI's API returns them), `worker` (runs the batches' requests through the
router's own proxy at low priority, admitting each one only while the engines have room),
`metrics` (`kvpilot_batch_*`), `api` (the routes), `bench` (`kvpilot bench batch`: interactive
TTFT alone and while a batch drains). Input lines are read by the engine's
torch-free `kvpilot_engine.batch.protocol`, the same code as `kvpilot run-batch`.
"""
