"""Multi-LoRA serving: PEFT adapters applied per sequence in one batch, without merging weights.

request.py: LoRARequest and LoRAError (the contract with callers and the server).
"""

from kvpilot_engine.lora.request import LoRAError, LoRARequest

__all__ = ["LoRAError", "LoRARequest"]
