"""Model definitions. One class serves the whole Llama family (see llama.py)."""
