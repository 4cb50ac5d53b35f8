"""Triton kernels for the GPU path (paged KV cache write and paged attention).

Importing this package imports Triton, so it is imported only where CUDA tensors are used; the
CPU path stays on the PyTorch reference in `kvpilot_engine.attention`. The tests run the same
kernels on CPU through the Triton interpreter, setting TRITON_INTERPRET=1 before the import.
"""
