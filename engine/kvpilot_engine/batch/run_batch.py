"""`kvpilot run-batch -i IN -o OUT [MODEL]`: an OpenAI batch file through one offline engine.

The whole file is one static batch: its requests are fed to the engine's continuous batching a
window at a time (enough to keep every slot full, few enough that waiting requests do not hold
memory), and each result is appended to the output as soon as its request finishes, so the
output is a log a rerun can resume from: ids already there are skipped, and a line cut short by a
kill is cut off and redone. Requests are parsed, checked and answered by the server's own code
(the request models, `chat_params`/`completion_params`, `chat_response`/`completion_response`),
so a line's result is what `kvpilot serve` would have answered; a line the server would refuse
gets that refusal, and no line stops the others.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import IO, Any, TypeVar

from pydantic import BaseModel, ValidationError
from tqdm.auto import tqdm

from kvpilot_engine.batch import protocol
from kvpilot_engine.config import EngineArgs
from kvpilot_engine.llm import LLM
from kvpilot_engine.llm_engine import LLMEngine
from kvpilot_engine.outputs import RequestOutput
from kvpilot_engine.sampling_params import RequestOutputKind, SamplingParams
from kvpilot_engine.server.errors import APIError, from_engine_error, validation_error
from kvpilot_engine.server.guard import GuardSettings, request_priority
from kvpilot_engine.server.protocol import ChatCompletionRequest, CompletionRequest, UsageInfo
from kvpilot_engine.server.serving import Choice
from kvpilot_engine.server.serving_chat import chat_params, chat_prompt, chat_response
from kvpilot_engine.server.serving_completion import (
    completion_params,
    completion_response,
    echo_prefixes,
    tokenize,
)
from kvpilot_engine.server.tools import tool_context

T = TypeVar("T", bound=BaseModel)

# Engine requests in flight at once: a few times the default max_num_seqs (256).
DEFAULT_MAX_INFLIGHT = 1024


@dataclass
class _Pending:
    """One input line in the engine: its engine requests, and how to build its response."""

    custom_id: str
    rids: list[str]
    build: Callable[[list[Choice], UsageInfo], BaseModel]
    outputs: dict[str, RequestOutput] = field(default_factory=dict)

    def response(self) -> BaseModel:
        choices, prompt, completion = [], 0, 0
        for rid in self.rids:  # prompt order; each prompt's samples by index, as the server's
            out = self.outputs[rid]
            prompt += len(out.prompt_token_ids)
            for c in sorted(out.outputs, key=lambda c: c.index):
                completion += len(c.token_ids)
                choices.append(
                    Choice(
                        text=c.text,
                        token_ids=list(c.token_ids),
                        logprobs=list(c.logprobs or []),
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                    )
                )
        usage = UsageInfo(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )
        return self.build(choices, usage)


@dataclass
class BatchSummary:
    total: int = 0  # lines in the input
    skipped: int = 0  # already in the output
    succeeded: int = 0
    failed: int = 0  # refused requests and lines that were no request
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


class BatchRunner:
    """Turns batch lines into engine requests and finished requests into output lines."""

    def __init__(self, llm: LLM, served_model_name: str):
        self.engine: LLMEngine = llm.llm_engine
        self.model = served_model_name

    def submit(self, req: protocol.BatchRequestInput) -> _Pending:
        """Add one line's engine requests; APIError if the server would refuse it."""
        if req.url == "/v1/chat/completions":
            pending, prompts, params, priority = self._chat(req)
        else:
            pending, prompts, params, priority = self._completion(req)
        added: list[str] = []
        try:
            for rid, prompt in zip(pending.rids, prompts, strict=True):
                # A copy each: the engine fills in max_tokens per prompt.
                p = replace(params, output_kind=RequestOutputKind.FINAL_ONLY)
                self.engine.add_request(rid, prompt, p, priority=priority)
                added.append(rid)
        except ValueError as e:
            if added:
                self.engine.abort_request(added)
            raise from_engine_error(e) from None
        return pending

    @staticmethod
    def _next_rid(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    def _check(self, model: str, stream: bool, priority: int) -> int:
        if model != self.model:
            raise APIError(
                404,
                f"the model {model!r} does not exist; this batch runs {self.model!r}",
                param="model",
                code="model_not_found",
            )
        if stream:
            raise APIError(400, "stream is not supported in a batch", param="stream")
        return request_priority({}, priority, GuardSettings())

    def _chat(
        self, line: protocol.BatchRequestInput
    ) -> tuple[_Pending, list[str | list[int]], SamplingParams, int]:
        req = _validate(ChatCompletionRequest, line.body)
        priority = self._check(req.model, req.stream, req.priority)
        # Tool choices "required" and named are grammars and work offline; "auto" has no parser
        # flag here and is answered without the tools.
        tools = tool_context(req, None)
        params, k = chat_params(req, tools)
        prompt = chat_prompt(self.engine, req, tools)
        rid, created = self._next_rid("chatcmpl"), int(time.time())

        def build(choices: list[Choice], usage: UsageInfo) -> BaseModel:
            return chat_response(rid, created, req.model, choices, usage, k, tools)

        return _Pending(line.custom_id, [rid], build), [prompt], params, priority

    def _completion(
        self, line: protocol.BatchRequestInput
    ) -> tuple[_Pending, list[str | list[int]], SamplingParams, int]:
        req = _validate(CompletionRequest, line.body)
        priority = self._check(req.model, req.stream, req.priority)
        prompts, params = completion_params(req)
        token_ids = tokenize(self.engine, prompts)
        echo = echo_prefixes(self.engine, req, prompts)
        rid, created = self._next_rid("cmpl"), int(time.time())
        with_logprobs = req.logprobs is not None

        def build(choices: list[Choice], usage: UsageInfo) -> BaseModel:
            return completion_response(rid, created, req.model, choices, usage, echo, with_logprobs)

        rids = [f"{rid}-{i}" for i in range(len(prompts))]
        return _Pending(line.custom_id, rids, build), token_ids, params, priority


def _validate(model: type[T], body: dict[str, Any]) -> T:
    # Through JSON, as the server parses: the request models are strict, and in JSON mode an
    # integer where a float is due is fine, where Python mode would refuse it.
    try:
        return model.model_validate_json(json.dumps(body))
    except ValidationError as e:
        raise validation_error(e) from None


def run_batch(
    llm: LLM,
    input_path: str,
    output_path: str,
    served_model_name: str,
    max_inflight: int = DEFAULT_MAX_INFLIGHT,
    use_tqdm: bool = True,
) -> BatchSummary:
    """Answer every line of `input_path` not yet in `output_path`, appending to it."""
    t0 = time.perf_counter()
    with open(input_path, "rb") as f:
        lines = protocol.read_lines(f.read())
    done, resumed = _prepare_output(output_path)
    summary = BatchSummary(total=len(lines))
    runner = BatchRunner(llm, served_model_name)
    todo = []
    with open(output_path, "a", encoding="utf-8") as out:
        # Lines that are no request first, all at once: those without a custom_id cannot be
        # recognised in the output, so a resumed run skips them all (they were written first).
        for line in lines:
            if line.error is None:
                todo.append(line)
            elif (line.custom_id in done) or (line.custom_id is None and resumed):
                summary.skipped += 1
            else:
                _write(out, protocol.line_error(line))
                summary.failed += 1
        todo = [ln for ln in todo if ln.request and ln.request.custom_id not in done]
        summary.skipped += sum(1 for ln in lines if ln.error is None) - len(todo)
        bar = tqdm(total=len(todo), desc="run-batch", unit="req", disable=not use_tqdm)
        try:
            _drain(runner, todo, out, summary, bar, max_inflight)
        finally:
            bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def _prepare_output(path: str) -> tuple[set[str], bool]:
    """The ids already answered in an existing output (cut back to its last whole line)."""
    if not os.path.exists(path):
        return set(), False
    with open(path, "rb") as f:
        data = f.read()
    done, end = protocol.finished_ids(data)
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return done, end > 0


def _write(out: IO[str], text: str) -> None:
    out.write(text + "\n")
    out.flush()


def _drain(
    runner: BatchRunner,
    todo: list[protocol.Line],
    out: IO[str],
    summary: BatchSummary,
    bar: tqdm,
    max_inflight: int,
) -> None:
    engine = runner.engine
    by_rid: dict[str, _Pending] = {}
    queue = iter(todo)
    exhausted = False
    try:
        while True:
            while not exhausted and engine.get_num_unfinished_requests() < max_inflight:
                line = next(queue, None)
                if line is None:
                    exhausted = True
                    break
                assert line.request is not None
                try:
                    pending = runner.submit(line.request)
                except APIError as e:
                    _write(
                        out,
                        protocol.api_error(
                            line.request.custom_id, e.status, e.message, e.param, e.code
                        ),
                    )
                    summary.failed += 1
                    bar.update(1)
                    continue
                for rid in pending.rids:
                    by_rid[rid] = pending
            if exhausted and not engine.has_unfinished_requests():
                break
            for result in engine.step():
                if not result.finished:
                    continue
                pending = by_rid.pop(result.request_id)
                pending.outputs[result.request_id] = result
                if len(pending.outputs) < len(pending.rids):
                    continue
                _write(out, protocol.success(pending.custom_id, pending.response()))
                summary.succeeded += 1
                for o in pending.outputs.values():
                    summary.prompt_tokens += len(o.prompt_token_ids)
                    summary.completion_tokens += sum(len(c.token_ids) for c in o.outputs)
                bar.update(1)
    finally:
        if by_rid:  # interrupted: free the KV blocks of what was not written
            engine.abort_request(list(by_rid))
            engine.step()


def main(ns: argparse.Namespace, args: EngineArgs) -> int:
    """The command: `ns` from the parser, `args` the EngineArgs it names."""
    llm = LLM.from_engine(LLMEngine.from_engine_args(args))
    s = run_batch(
        llm,
        ns.input_file,
        ns.output_file,
        ns.served_model_name or ns.model,
        max_inflight=ns.max_inflight,
        use_tqdm=not ns.disable_progress_bar,
    )
    tokens = s.prompt_tokens + s.completion_tokens
    print(
        f"run-batch: {s.succeeded} succeeded, {s.failed} failed, {s.skipped} already done, of "
        f"{s.total} lines; {s.seconds:.1f} s, {s.succeeded / max(s.seconds, 1e-9):.2f} requests/s, "
        f"{tokens / max(s.seconds, 1e-9):.0f} tokens/s "
        f"({s.completion_tokens / max(s.seconds, 1e-9):.0f} generated)",
        file=sys.stderr,
    )
    return 0
