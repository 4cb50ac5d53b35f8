"""LLM: offline batched generation in vLLM's shape, `LLM(model).generate(prompts, params)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from typing import Any

from tqdm.auto import tqdm

from kvpilot_engine.config import EngineArgs
from kvpilot_engine.llm_engine import LLMEngine
from kvpilot_engine.lora.request import LoRARequest
from kvpilot_engine.outputs import RequestOutput
from kvpilot_engine.sampling_params import RequestOutputKind, SamplingParams
from kvpilot_engine.tokenizer import Tokenizer

PromptType = str | list[int] | dict[str, Any]


def _normalize_prompts(prompts: PromptType | Seq[PromptType]) -> list[str | list[int]]:
    """One prompt or many; each a string, a list of token ids, or {"prompt": ...} /
    {"prompt_token_ids": [...]} as vLLM accepts."""
    if isinstance(prompts, (str, dict)) or (
        isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
    ):
        prompts = [prompts]  # type: ignore[list-item]
    out: list[str | list[int]] = []
    for p in prompts:  # type: ignore[union-attr]
        if isinstance(p, dict):
            if "prompt_token_ids" in p:
                out.append(list(p["prompt_token_ids"]))
            elif "prompt" in p:
                out.append(p["prompt"])
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        elif isinstance(p, str):
            out.append(p)
        else:
            out.append(list(p))
    return out


class LLM:
    def __init__(self, model: str = "smollm2", **engine_args: Any):
        self.llm_engine = LLMEngine.from_engine_args(EngineArgs(model=model, **engine_args))
        self._ids = itertools.count()

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> LLM:
        llm = cls.__new__(cls)
        llm.llm_engine = engine
        llm._ids = itertools.count()
        return llm

    def get_tokenizer(self) -> Tokenizer:
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Seq[int] | None = None,
        lora_request: LoRARequest | Seq[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion with continuous batching; outputs in prompt order.

        `lora_request`: one LoRA adapter for every prompt, or one (or None) per prompt. Each
        adapter is loaded (and checked: LoRAError) before any prompt runs."""
        items = _normalize_prompts(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(items)
        else:
            params = list(sampling_params)
            if len(params) != len(items):
                raise ValueError("give one SamplingParams, or one per prompt")
        if lora_request is None or isinstance(lora_request, LoRARequest):
            loras: list[LoRARequest | None] = [lora_request] * len(items)
        else:
            loras = list(lora_request)
            if len(loras) != len(items):
                raise ValueError("give one LoRARequest, or one (or None) per prompt")
        engine = self.llm_engine
        # Loaded here, so a broken adapter fails the call before anything runs; with more
        # adapters than max_cpu_loras the host cache reloads the evicted ones as their turn comes.
        for lora in dict.fromkeys(r for r in loras if r is not None):
            engine.add_lora(lora)
        ids: list[str] = []
        for i, (prompt, p) in enumerate(zip(items, params, strict=True)):
            rid = str(next(self._ids))
            # Copy: the engine fills in max_tokens=None per prompt, and we want final outputs only.
            p = SamplingParams(**{**p.__dict__, "output_kind": RequestOutputKind.FINAL_ONLY})
            try:
                engine.add_request(
                    rid, prompt, p, priority=priority[i] if priority else 0, lora_request=loras[i]
                )
            except Exception:
                engine.abort_request(ids)
                engine.step()  # collect the aborts so the engine is clean for the next call
                raise
            ids.append(rid)
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm)
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        bar.update(1)
        finally:
            bar.close()
            pending = [r for r in ids if r not in results]
            if pending:  # interrupted: do not leave requests holding KV blocks
                engine.abort_request(pending)
                engine.step()
        return [results[r] for r in ids]

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        lora_request: LoRARequest | Seq[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or many, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.get_tokenizer()
        prompts = [
            tok.encode(
                tok.apply_chat_template(c, add_generation_prompt=add_generation_prompt),
                add_special_tokens=False,
            )
            for c in convs  # type: ignore[union-attr]
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)
