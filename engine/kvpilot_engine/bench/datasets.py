"""Prompt sets for speculative decoding's workloads, as text (no torch: `bench serve` sends
them to any server). Each builder gives n different prompts.

  edit  a source file of the engine and the start of a copy of it: the answer repeats the file
  qa    a document (the engine's own docstrings and code) and a question answered by quoting it
  chat  open questions with nothing to copy

The files are the first 1,500 characters of engine modules as they were when the workloads were
first measured, kept in texts/: read from the live modules, the workload changed whenever their
docstrings did (a small model copies some texts faithfully and drifts on others), and figures
taken on different days were not comparable.
"""

from __future__ import annotations

from pathlib import Path

_TEXTS = Path(__file__).resolve().parent / "texts"
_SOURCES = ["block_manager.py", "scheduler.py", "sequence.py", "sampling_params.py"]
_QUESTIONS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how vaccines train the immune system, for a curious twelve-year-old.",
    "Describe a walk through a busy market in a city you invent.",
    "What are the pros and cons of working from home? Discuss in detail.",
    "Plan a three-day trip to the mountains for a family with two small children.",
    "Why do leaves change colour in autumn? Explain the chemistry simply.",
    "Write a letter to your future self, ten years from now.",
    "Compare trains and planes for travelling across a continent.",
    "Tell the history of bread, from the first farmers to the modern bakery.",
    "Give advice to someone starting to learn the violin as an adult.",
    "Invent a board game and explain its rules.",
    "What makes a good teacher? Give examples from everyday school life.",
    "Describe the life cycle of a star, from a cloud of gas to its end.",
    "Write a dialogue between a cat and a dog arguing about who is the better pet.",
    "How would you organise a small community garden? Describe the first year.",
    "Explain why the sky is blue and sunsets are red.",
]


def _text(module: str, chars: int) -> str:
    """A pinned module text (see the docstring)."""
    return (_TEXTS / (module.replace("/", "_") + ".txt")).read_text()[:chars]


def edit_prompts(n: int, chars: int = 1500) -> list[str]:
    out = []
    for i in range(n):
        code = _text(_SOURCES[i % len(_SOURCES)], chars)
        out.append(f"Copy this code exactly.\n\n{code}\n\nCopy:\n\n{code[:80]}")
    return out


def chat_prompts(n: int) -> list[str]:
    return [_QUESTIONS[i % len(_QUESTIONS)] + "\n\n" for i in range(n)]


# Document QA: a passage of the engine's own docstrings and a question it answers.
_DOCS = [
    ("spec_decode/adaptive.py", "What does the cost model of a step consist of?"),
    ("spec_decode/draft_model.py", "How does the draft model keep its cache in step?"),
    ("block_manager.py", "How are blocks shared between sequences?"),
    ("spec_decode/verify.py", "Why is the verification exact?"),
]


def qa_prompts(n: int, chars: int = 1500) -> list[str]:
    out = []
    for i in range(n):
        name, question = _DOCS[i % len(_DOCS)]
        doc = _text(name, chars)
        out.append(
            f"Read this document.\n\n{doc}\n\nQuestion: {question} Answer by quoting the "
            "document.\n\nAnswer: The document says:"
        )
    return out


WORKLOADS = {"edit": edit_prompts, "qa": qa_prompts, "chat": chat_prompts}
