"""Offline batches in OpenAI's batch file format (JSONL in, JSONL out), vLLM's `run-batch`.

Modules: `protocol` (the input and output lines, and reading an input file line by line into
requests or per-line errors; torch-free, so the router's Batch API shares it), `run_batch`
(`kvpilot run-batch`: every line through one offline engine, results appended as they finish,
resumable).
"""
