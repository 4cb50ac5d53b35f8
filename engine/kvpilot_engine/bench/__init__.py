"""Benchmarks behind `kvpilot bench ...`: they print figures and compare against a peer."""
