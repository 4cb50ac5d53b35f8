"""kvpilot's control plane: the LLMService API, the kopf operator, and (later) autoscaler and
router. Imports neither torch nor the engine: the operator image must not carry them."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kvpilot")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
