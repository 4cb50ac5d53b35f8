"""Prompt sets for speculative decoding's workloads, as text (no torch: `bench serve` sends
them to any server). Each builder gives n different prompts.

  edit  a source file of the engine and the start of a copy of it: the answer repeats the file
  qa    a document (the engine's own docstrings and code) and a question answered by quoting it
  chat  open questions with nothing to copy
"""

from __future__ import annotations

from pathlib import Path

_SOURCES = ["block_manager.py", "scheduler.py", "sequence.py", "sampling_params.py"]
_QUESTIONS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how vaccines train the immune system, for a curious twelve-year-old.",
    "Describe a walk through a busy market in a city you invent.",
    "What are the pros and cons of working from home? Discuss in detail.",
]


def edit_prompts(n: int, chars: int = 1500) -> list[str]:
    here = Path(__file__).resolve().parent.parent
    out = []
    for i in range(n):
        code = (here / _SOURCES[i % len(_SOURCES)]).read_text()[:chars]
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
    here = Path(__file__).resolve().parent.parent
    out = []
    for i in range(n):
        name, question = _DOCS[i % len(_DOCS)]
        doc = (here / name).read_text()[:chars]
        out.append(
            f"Read this document.\n\n{doc}\n\nQuestion: {question} Answer by quoting the "
            "document.\n\nAnswer: The document says:"
        )
    return out


WORKLOADS = {"edit": edit_prompts, "qa": qa_prompts, "chat": chat_prompts}
