"""OpenAIServingModels: the names this server answers to, the base model and its LoRA adapters.

The OpenAI `model` field picks what runs a request, as in vLLM: the base model's served name runs
it on the base weights, an adapter's name on that adapter. Adapters come from `--lora-modules`
(registered before the server is ready) or, when runtime updating is allowed, from
`POST /v1/load_lora_adapter` / `POST /v1/unload_lora_adapter`.

An adapter's path is a local folder or any model source URI (`hf://`, `s3://`, `pvc://`, `oci://`),
downloaded into a cache folder first. A runtime load downloads and reads the adapter on a worker
thread and only then hands it to the engine thread, so requests already running keep stepping;
a load is serialised with the other loads and unloads, never with requests.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from kvpilot_engine.lora.request import LoRAError, LoRARequest
from kvpilot_engine.server.errors import APIError
from kvpilot_engine.server.protocol import ModelCard, ModelList

if TYPE_CHECKING:
    from kvpilot_engine.server.async_engine import AsyncLLMEngine

log = structlog.get_logger("kvpilot.server")

# vLLM's switch for the runtime endpoints; `--allow-runtime-lora-updating` is ours.
RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
LORA_CACHE = "~/.cache/kvpilot/loras"


@dataclass(frozen=True)
class LoRAModulePath:
    """One `--lora-modules` entry (vLLM's name): `name=path` or
    `{"name": ..., "path": ..., "base_model_name": ...}`."""

    name: str
    path: str
    base_model_name: str | None = None


def parse_lora_module(value: str) -> LoRAModulePath:
    """Parse one `--lora-modules` value; ValueError saying what is wrong."""
    text = value.strip()
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise ValueError(f"--lora-modules {value!r}: not valid JSON ({e})") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise ValueError(f"--lora-modules {value!r}: expected a JSON object with name and path")
        unknown = set(raw) - {"name", "path", "base_model_name"}
        if unknown:
            raise ValueError(f"--lora-modules {value!r}: unknown keys {sorted(unknown)}")
        name, path, base = raw["name"], raw.get("path"), raw.get("base_model_name")
        if not isinstance(path, str) or (base is not None and not isinstance(base, str)):
            raise ValueError(f"--lora-modules {value!r}: path and base_model_name are strings")
    else:
        name, sep, path = text.partition("=")
        base = None
        if not sep:
            raise ValueError(f"--lora-modules {value!r}: expected name=path or a JSON object")
    if not name.strip() or not path.strip():
        raise ValueError(f"--lora-modules {value!r}: the name and the path must not be empty")
    return LoRAModulePath(name.strip(), path.strip(), base)


def runtime_lora_updating_env() -> bool:
    return os.environ.get(RUNTIME_LORA_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def resolve_lora_path(path: str, download_dir: str | None = None) -> str:
    """The local folder for an adapter path: a folder as it is; a source URI (or a Hub repo id
    that is not a local path, as vLLM takes it) downloaded into `download_dir` (default
    ~/.cache/kvpilot/loras), one folder per URI, reused by the next load. Blocking: call it on a
    worker thread. LoRAError with the source's reason (NotFound, Unauthorized, Unreachable, ...)."""
    from kvpilot_engine.sources.base import cache_folder, source_uri

    uri = source_uri(path)
    if uri is None:
        return os.path.expanduser(path)
    from kvpilot_engine.sources import SourceError, download

    dest = cache_folder(uri, download_dir or LORA_CACHE)
    try:
        download(uri, dest)
    except SourceError as e:
        raise LoRAError(e.reason, f"cannot fetch the adapter {uri}: {e}") from e
    return str(dest)


def lora_error(e: LoRAError, param: str = "lora_path") -> APIError:
    """An adapter that cannot be served: 404 when it is not there (as vLLM answers), else 400;
    the reason is the error's code and opens its message."""
    status = 404 if e.reason == "NotFound" else 400
    return APIError(status, f"{e.reason}: {e}", param=param, code=e.reason)


class OpenAIServingModels:
    def __init__(
        self,
        engine: AsyncLLMEngine,
        served_model_name: str,
        lora_modules: list[LoRARequest] | None = None,
        *,
        lora_sources: dict[str, str] | None = None,
        allow_runtime_updates: bool = False,
        download_dir: str | None = None,
    ):
        self.engine = engine
        self.served_model_name = served_model_name
        self.allow_runtime_updates = allow_runtime_updates
        self.download_dir = download_dir
        self.lora_requests: dict[str, LoRARequest] = {r.lora_name: r for r in lora_modules or ()}
        # What each adapter was loaded from as the user wrote it (a URI), for its card's root.
        self.lora_sources: dict[str, str] = dict(lora_sources or {})
        # Ids are never reused: the engine keys its caches by id, and an id must always name one
        # path (a reloaded adapter may be another version of the files).
        self._next_id = max((r.lora_int_id for r in self.lora_requests.values()), default=0) + 1
        self._lock = asyncio.Lock()

    # ---- request routing ---------------------------------------------------------------------
    def lora_for(self, model: str) -> LoRARequest | None:
        """The adapter a request's `model` names (None: the base model); 404 model_not_found
        for a name this server does not serve."""
        if model == self.served_model_name:
            return None
        lora = self.lora_requests.get(model)
        if lora is None:
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves "
                f"{self.served_model_name!r}"
                + (" and the LoRA adapters GET /v1/models lists" if self.lora_requests else ""),
                param="model",
                code="model_not_found",
            )
        return lora

    def show_available_models(self) -> ModelList:
        llm = self.engine.engine
        max_len = llm.max_model_len if llm is not None else None
        base = ModelCard(
            id=self.served_model_name,
            root=llm.checkpoint.name if llm is not None else None,
            max_model_len=max_len,
        )
        cards = [base] + [
            ModelCard(
                id=r.lora_name,
                root=self.lora_sources.get(r.lora_name, r.lora_path),
                parent=r.base_model_name or self.served_model_name,
                max_model_len=max_len,
            )
            for r in self.lora_requests.values()
        ]
        return ModelList(data=cards)

    # ---- runtime updates ---------------------------------------------------------------------
    def _check_runtime_allowed(self) -> None:
        if not self.allow_runtime_updates:
            # vLLM has no such route then (a plain 404); ours says how to turn it on.
            raise APIError(
                404,
                "loading and unloading LoRA adapters at runtime is off: start the server with "
                f"--allow-runtime-lora-updating (or {RUNTIME_LORA_ENV}=True)",
                code="runtime_lora_updating_disabled",
            )

    async def load_lora_adapter(self, lora_name: str, lora_path: str) -> LoRARequest:
        self._check_runtime_allowed()
        if lora_name == self.served_model_name:
            raise APIError(
                400,
                f"{lora_name!r} is the base model's name; an adapter needs its own",
                param="lora_name",
                code="invalid_value",
            )
        async with self._lock:
            if lora_name in self.lora_requests:
                raise APIError(
                    400,
                    f"The lora adapter '{lora_name}' has already been loaded.",
                    param="lora_name",
                    code="invalid_value",
                )
            try:
                local = await asyncio.to_thread(resolve_lora_path, lora_path, self.download_dir)
                req = LoRARequest(lora_name, self._next_id, local)
                self._next_id += 1
                await self.engine.add_lora(req)
            except LoRAError as e:
                log.warning("lora load failed", lora_name=lora_name, reason=e.reason, error=str(e))
                raise lora_error(e) from None
            # Served under the path the caller gave (the card's root), loaded from the local copy.
            self.lora_requests[lora_name] = req
            self.lora_sources[lora_name] = lora_path
        log.info("lora loaded", lora_name=lora_name, lora_int_id=req.lora_int_id, path=lora_path)
        return req

    async def unload_lora_adapter(self, lora_name: str) -> None:
        self._check_runtime_allowed()
        async with self._lock:
            req = self.lora_requests.get(lora_name)
            if req is None:
                raise APIError(
                    404,
                    f"The lora adapter '{lora_name}' cannot be found.",
                    param="lora_name",
                    code="lora_not_found",
                )
            # Unknown to new requests first; those already running on it finish on it.
            del self.lora_requests[lora_name]
            self.lora_sources.pop(lora_name, None)
            await self.engine.remove_lora(req.lora_int_id)
        log.info("lora unloaded", lora_name=lora_name, lora_int_id=req.lora_int_id)
