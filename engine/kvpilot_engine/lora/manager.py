"""LoRAManager: which adapters the engine knows, which are loaded on the host, which sit in a
device slot, and loading them off the step loop.

Three tiers, as in S-LoRA and vLLM:
- known: every adapter added (`add_lora`) or named by a request. Each gets a key, unique per
  loaded version (adding an id again with another path is a new version with a new key); the
  key is what sequences, slots and the prefix cache's hashes name.
- host: up to max_cpu_loras adapters' weights in CPU memory (LRU). An adapter a request needs
  that is not there is read by a one-thread executor while the request waits in the queue:
  running requests never wait on a disk.
- device: max_loras slots (LoRABanks). The scheduler admits a sequence only while its adapter is
  loaded and running sequences use fewer than max_loras adapters (or already use its one), so
  each step's adapters fit; an adapter is copied into a slot in the step that first runs it,
  replacing the least recently used one that no running sequence uses.

Not thread-safe, like the engine: everything runs on the engine's thread except `load_adapter`.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from kvpilot_engine.config import ModelConfig
from kvpilot_engine.lora.adapter import LoRAAdapter, load_adapter
from kvpilot_engine.lora.layers import LoRABanks
from kvpilot_engine.lora.request import LoRAError, LoRARequest
from kvpilot_engine.sequence import Sequence

logger = logging.getLogger("kvpilot.engine")


@dataclass(eq=False)
class _Entry:
    key: int
    request: LoRARequest
    adapter: LoRAAdapter | None = None  # on the host (None: not loaded, or evicted)
    registered: bool = True  # False once removed: only sequences already queued still use it
    error: LoRAError | None = None
    waiting_on: Future[LoRAAdapter] | None = field(default=None, repr=False)


class LoRAManager:
    def __init__(
        self,
        model_config: ModelConfig,
        max_loras: int,
        max_lora_rank: int,
        max_cpu_loras: int | None,
        banks: LoRABanks,
    ):
        self.model_config = model_config
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max_cpu_loras or max_loras
        self.banks = banks
        self._next_key = 1
        self.by_id: dict[int, _Entry] = {}  # registered adapters
        self.by_key: dict[int, _Entry] = {}  # every entry a sequence or a slot may still name
        self.host: OrderedDict[int, None] = OrderedDict()  # keys with weights on the host, LRU
        # key -> device slot; the ModelRunner reads it to give each token its slot.
        self.slot_of: dict[int, int] = {}
        self.slot_lru: OrderedDict[int, None] = OrderedDict()
        self._executor: ThreadPoolExecutor | None = None
        self._loading: _Entry | None = None
        self._waiting_keys: set[int] = set()  # as of the last poll
        self.num_loads = 0  # host loads (from disk), for tests and logs
        self.num_slot_loads = 0  # copies into a device slot

    # ---- adding and removing ---------------------------------------------------------------
    def _new_entry(self, request: LoRARequest) -> _Entry:
        entry = _Entry(self._next_key, request)
        self._next_key += 1
        self.by_key[entry.key] = entry
        old = self.by_id.get(request.lora_int_id)
        if old is not None:
            self._unregister(old)
        self.by_id[request.lora_int_id] = entry
        return entry

    def add(self, request: LoRARequest, adapter: LoRAAdapter | None = None) -> bool:
        """Load an adapter onto the host now (`adapter`: read already, by load_adapter on another
        thread). False if it was loaded already. Adding a known id with another path replaces
        that adapter: requests queued on the old one finish on it."""
        entry = self.by_id.get(request.lora_int_id)
        same = entry is not None and entry.request.lora_path == request.lora_path
        if same and entry is not None and (entry.adapter is not None or entry.key in self.slot_of):
            self._touch_host(entry)
            return False
        if adapter is None:
            adapter = load_adapter(request, self.model_config, self.max_lora_rank)
        elif adapter.rank > self.max_lora_rank:
            raise LoRAError(
                "RankTooLarge",
                f"LoRA adapter {request.lora_name!r} has rank {adapter.rank}, above "
                f"max_lora_rank {self.max_lora_rank}",
            )
        if entry is None or entry.request.lora_path != request.lora_path:
            entry = self._new_entry(request)
        entry.error = None
        self._put_host(entry, adapter)
        return True

    def remove(self, lora_int_id: int) -> bool:
        entry = self.by_id.get(lora_int_id)
        if entry is None:
            return False
        self._unregister(entry)
        return True

    def _unregister(self, entry: _Entry) -> None:
        entry.registered = False
        if self.by_id.get(entry.request.lora_int_id) is entry:
            del self.by_id[entry.request.lora_int_id]
        # Its weights stay while queued sequences use it; collect() drops them afterwards.

    def list(self) -> list[LoRARequest]:
        return [e.request for e in self.by_id.values()]

    def key_for(self, request: LoRARequest) -> int:
        """The key a new request's sequences carry. An adapter not known yet is registered and
        will be loaded in the background; only a missing folder fails here (no file is read)."""
        entry = self.by_id.get(request.lora_int_id)
        if entry is None:
            if not request.lora_path or not os.path.isdir(request.lora_path):
                raise LoRAError(
                    "NotFound",
                    f"LoRA adapter {request.lora_name!r} (id {request.lora_int_id}) is not loaded "
                    f"and has no folder at {request.lora_path!r}",
                )
            entry = self._new_entry(request)
        return entry.key

    # ---- the host cache ----------------------------------------------------------------------
    def ready(self, key: int) -> bool:
        """Whether sequences on this adapter can be admitted: its weights are at hand."""
        entry = self.by_key.get(key)
        return entry is not None and (entry.adapter is not None or key in self.slot_of)

    def _touch_host(self, entry: _Entry) -> None:
        if entry.key in self.host:
            self.host.move_to_end(entry.key)

    def _put_host(self, entry: _Entry, adapter: LoRAAdapter) -> None:
        # (A slot holding this entry holds these same weights: a new version is a new entry.)
        entry.adapter = adapter
        self.host[entry.key] = None
        self.host.move_to_end(entry.key)
        self._trim_host(keep=entry.key)

    def _evictable(self, key: int) -> bool:
        # A copy in a device slot serves its sequences; otherwise a waiting one still needs it.
        return key in self.slot_of or key not in self._waiting_keys

    def _trim_host(self, keep: int | None = None) -> None:
        while len(self.host) > self.max_cpu_loras:
            victim = next((k for k in self.host if k != keep and self._evictable(k)), None)
            if victim is None:  # everything there is needed: over the limit until they run
                return
            del self.host[victim]
            self.by_key[victim].adapter = None

    # ---- each step ---------------------------------------------------------------------------
    def poll(self, waiting: Iterable[Sequence], running: Iterable[Sequence]) -> list[_Entry]:
        """Before scheduling: take in a finished load, start the next one a waiting sequence
        needs, and drop removed adapters nothing uses. Returns the adapters whose load failed
        (their requests must be failed: they can never run)."""
        if not self.by_key:  # no adapter known: no sequence names one, nothing to do
            return []
        waiting_keys = [s.lora_key for s in waiting if s.lora_key]
        self._waiting_keys = set(waiting_keys)
        used = self._waiting_keys | {s.lora_key for s in running if s.lora_key}
        failed: list[_Entry] = []
        if self._loading is not None and self._loading.waiting_on is not None:
            fut = self._loading.waiting_on
            if fut.done():
                entry, self._loading = self._loading, None
                entry.waiting_on = None
                try:
                    adapter = fut.result()
                    if entry.adapter is None:  # (unless add_lora loaded it meanwhile)
                        self._put_host(entry, adapter)
                    self.num_loads += 1
                except LoRAError as e:
                    entry.error = e
                    failed.append(entry)
                    self._unregister(entry)
                except Exception as e:  # a bug or an I/O error: fail its requests, not the engine
                    entry.error = LoRAError("Corrupt", f"{type(e).__name__}: {e}")
                    failed.append(entry)
                    self._unregister(entry)
        if self._loading is None:
            for key in dict.fromkeys(waiting_keys):
                entry = self.by_key[key]
                if entry.error is not None or self.ready(key):
                    continue
                room = len(self.host) < self.max_cpu_loras or any(
                    self._evictable(k) for k in self.host
                )
                if room:
                    self._start_load(entry)
                break  # in queue order: the oldest waiting adapter first
        self._trim_host()
        self._collect(used)
        return failed

    def _start_load(self, entry: _Entry) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="kvpilot-lora-load")
        entry.waiting_on = self._executor.submit(
            load_adapter, entry.request, self.model_config, self.max_lora_rank
        )
        self._loading = entry

    @property
    def loading(self) -> bool:
        return self._loading is not None

    def wait_for_load(self, timeout: float) -> None:
        """Nothing can run until a load finishes: wait for it instead of spinning."""
        if self._loading is not None and self._loading.waiting_on is not None:
            wait([self._loading.waiting_on], timeout=timeout)

    def _collect(self, used: set[int]) -> None:
        for key, entry in list(self.by_key.items()):
            if entry.registered or key in used or entry is self._loading:
                continue
            if key in self.slot_of:
                self._free_slot(key)
            self.host.pop(key, None)
            entry.adapter = None
            del self.by_key[key]

    # ---- device slots ------------------------------------------------------------------------
    def activate(self, keys: Iterable[int], running: Iterable[Sequence]) -> None:
        """Give each adapter of this step a device slot (the scheduler saw to it that they fit).
        A slot is taken from the least recently used adapter no running sequence uses."""
        pinned: set[int] | None = None  # looked up only when a slot must be taken
        for key in dict.fromkeys(k for k in keys if k):
            if key in self.slot_of:
                self.slot_lru.move_to_end(key)
                continue
            taken = set(self.slot_of.values())
            free = [s for s in range(self.max_loras) if s not in taken]
            if free:
                slot = free[0]
            else:
                if pinned is None:
                    pinned = {s.lora_key for s in running if s.lora_key}
                victim = next((k for k in self.slot_lru if k not in pinned), None)
                if victim is None:
                    raise RuntimeError("more LoRA adapters in one step than max_loras slots")
                slot = self._free_slot(victim)
            entry = self.by_key[key]
            if entry.adapter is None:
                raise RuntimeError(f"LoRA adapter {entry.request.lora_name!r} is not loaded")
            self.banks.load(slot, entry.adapter)
            self.num_slot_loads += 1
            self.slot_of[key] = slot
            self.slot_lru[key] = None
            self._touch_host(entry)

    def _free_slot(self, key: int) -> int:
        slot = self.slot_of.pop(key)
        self.slot_lru.pop(key, None)
        self.banks.clear(slot)
        return slot

    def names(self, seqs: Iterable[Sequence]) -> list[str]:
        """The adapters' names these sequences use, each once (the metrics' labels)."""
        if not self.by_key:
            return []
        keys = dict.fromkeys(s.lora_key for s in seqs if s.lora_key)
        return [self.by_key[k].request.lora_name for k in keys if k in self.by_key]

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
