"""`kvpilot serve`: the OpenAI-compatible HTTP server around LLMEngine.

Imported only by the serve command, so the engine library itself never needs FastAPI.
"""
