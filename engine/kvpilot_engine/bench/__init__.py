"""Benchmarks behind `kvpilot bench ...`: they print figures and compare against a peer.

Modules: `latency` (batch-1 decode speed and bandwidth, gpt-fast's way), `throughput` (offline
generation against transformers), `serve` (an online load generator for any OpenAI server),
`gpu_report` (the one table `scripts/gpu-check.sh` leaves from the GPU tests and benchmarks).
"""
