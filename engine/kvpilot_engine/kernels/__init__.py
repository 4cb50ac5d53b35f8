"""Triton kernels for the GPU path; each restates the contract of a PyTorch reference.

Modules: `attention` (the paged KV cache write and paged attention; reference
`kvpilot_engine.attention`), `norm` (RMSNorm, fused with the residual add; `models.llama.RMSNorm`),
`rotary` (rotary embedding over q and k in place; `models.llama.RotaryEmbedding`), `quant_matmul`
(int8 and int4 weight-only matmuls; `kvpilot_engine.quantization`).

Each module imports Triton, so its callers import it only where CUDA tensors are used (or
`KVPILOT_FORCE_TRITON=1`); the CPU path stays on the PyTorch references. The tests run the same
kernels on CPU through the Triton interpreter, setting TRITON_INTERPRET=1 before the import.
"""
