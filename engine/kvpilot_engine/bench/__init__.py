"""Benchmarks behind `kvpilot bench ...`: they print figures and compare against a peer.

Modules: `latency` (batch-1 decode speed and bandwidth, gpt-fast's way), `throughput` (offline
generation against transformers), `serve` (an online load generator for any OpenAI server).
"""
