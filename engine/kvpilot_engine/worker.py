"""Putting the model on its devices: each rank's shard, the KV pool's size, CUDA graphs, and the
tensor-parallel worker processes.

`Worker` is rank 0, in the engine's process: the LLMEngine builds one, steps the ModelRunner it
hands over, and shuts it down. With tensor parallelism it first starts ranks 1..n-1
(`WorkerGroup`, one process each, running `_tensor_parallel_worker`), loads its own shard while
they load theirs, and joins them in a process group (gloo on CPU, NCCL on GPUs). Rank 0 holds the
most KV heads, so its share of a block bounds the others': it sizes the KV pool and tells them
the size. Each step's inputs then go to every rank, which runs the same forward pass; the
collectives inside it, and how the model is cut into shards, are parallel.py's.

Step inputs travel over multiprocessing connections on socket pairs, not torch.distributed, whose
timeout would kill an idle server. The messages a rank serves: ("init", num_blocks), then
("step", StepInput) until ("shutdown",) or the end of its socket (rank 0 died).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from kvpilot_engine.config import EngineArgs, ModelConfig, parse_size, resolve_dtype
from kvpilot_engine.cpu_linear import prepack_linears
from kvpilot_engine.loader import Checkpoint, RandomCheckpoint, init_random, load_checkpoint
from kvpilot_engine.lora.layers import LoRABanks
from kvpilot_engine.model_runner import ModelRunner
from kvpilot_engine.models.llama import LlamaForCausalLM
from kvpilot_engine.parallel import Parallel
from kvpilot_engine.quantization import (
    QuantizationError,
    check_supported,
    default_int4_group,
    quantize_model,
    weight_bytes,
)
from kvpilot_engine.step_input import StepInput

logger = logging.getLogger("kvpilot.engine")

DEFAULT_CPU_KV_CACHE_MEMORY = 2 * 2**30
MAX_GRAPH_BATCH = 512  # decode batches above this run eagerly (launch overhead is amortised)
# A collective only waits for the other ranks to reach the same step, never for requests.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


class Worker:
    """Rank 0: the model on its device, the KV pool's size, and the other ranks' processes."""

    def __init__(self, args: EngineArgs, ckpt: Checkpoint):
        self.device = rank_device(args, 0)
        self.dtype = resolve_dtype(args.dtype, ckpt.config.torch_dtype, self.device)
        cfg = ckpt.config

        max_len = args.max_model_len or cfg.max_position_embeddings
        if cfg.sliding_window and cfg.sliding_window < max_len:
            # Attention here is full causal: within the window it equals sliding-window attention.
            logger.warning(
                "capping max_model_len to the model's sliding window %d", cfg.sliding_window
            )
            max_len = cfg.sliding_window
        self.max_model_len = max_len

        tp = args.tensor_parallel_size
        parallel = Parallel.for_rank(cfg, 0, tp)  # fails on an impossible split, before spawning
        self._ranks: WorkerGroup | None = None
        self._finalizer: weakref.finalize | None = None
        t0 = time.perf_counter()
        if tp > 1 and torch.distributed.is_initialized():
            raise RuntimeError(
                "torch.distributed is already initialised in this process: only one "
                "tensor-parallel engine runs per process (shut the other one down first)"
            )
        if tp > 1:
            port = free_port()
            self._ranks = WorkerGroup(_tensor_parallel_worker, tp, port, (args, str(ckpt.path)))
            self._finalizer = weakref.finalize(self, _stop_tensor_parallel, self._ranks)
        try:
            self.model, self.quantized_layers = load_model(
                ckpt, args, self.dtype, self.device, parallel
            )
            if self._ranks is not None:
                self._ranks.wait_ready()
                init_distributed(0, tp, port, self.device)
        except BaseException:
            self.shutdown()
            raise
        self.load_time = time.perf_counter() - t0
        self.weight_bytes = weight_bytes(self.model)
        # The LoRA slots take their memory before the KV pool is sized from what is left.
        self.lora_banks: LoRABanks | None = None
        if args.enable_lora:
            self.lora_banks = LoRABanks(
                self.model.config, args.max_loras, args.max_lora_rank, self.device, self.dtype
            )

        # This rank's share of a block; rank 0 holds the most KV heads, so it bounds the others.
        block_bytes = kv_bytes_per_block(self.model.config, args.block_size, self.dtype)
        if args.num_kv_blocks is not None:
            num_blocks = args.num_kv_blocks
        else:
            if args.kv_cache_memory is not None:
                budget = parse_size(args.kv_cache_memory)
            elif self.device.type == "cuda":
                budget = gpu_kv_budget(
                    self.model, args, self.max_model_len, self.device, self.dtype
                )
            else:
                budget = DEFAULT_CPU_KV_CACHE_MEMORY
            num_blocks = budget // block_bytes
        if num_blocks * args.block_size < self.max_model_len:
            self.shutdown()
            raise ValueError(
                f"the KV cache holds {num_blocks * args.block_size} tokens ({num_blocks} blocks of "
                f"{args.block_size}), fewer than max_model_len={self.max_model_len}; raise "
                "kv_cache_memory or lower max_model_len"
            )
        self.num_blocks = num_blocks
        self.kv_cache_bytes = num_blocks * block_bytes

        self.model_runner = ModelRunner(
            self.model,
            self.model.config,
            num_blocks,
            args.block_size,
            self.device,
            self.dtype,
            args.seed,
            broadcast=None if self._ranks is None else self._ranks.send_step,
            lora_banks=self.lora_banks,
        )
        if self._ranks is not None:
            self._ranks.send(("init", num_blocks))
        self.graph_capture_time: float | None = None
        if self.device.type == "cuda" and not args.enforce_eager and tp == 1:
            # (Tensor parallel runs eagerly: each rank would need its own graphs, NCCL in them.)
            self.graph_capture_time = self.model_runner.capture_graphs(
                min(args.max_num_seqs, MAX_GRAPH_BATCH), self.max_model_len
            )

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes (a no-op with one rank). Idempotent; also
        runs when the worker is collected or the interpreter exits."""
        if self._finalizer is not None:
            self._finalizer()


# ---- every rank: device, shard, KV sizing ------------------------------------------------------
def rank_device(args: EngineArgs, rank: int) -> torch.device:
    device = args.resolve_device()
    if device.type == "cuda" and args.tensor_parallel_size > 1:
        return torch.device("cuda", rank)  # one GPU per rank
    return device


def load_model(
    ckpt: Checkpoint,
    args: EngineArgs,
    dtype: torch.dtype,
    device: torch.device,
    parallel: Parallel,
) -> tuple[LlamaForCausalLM, dict[str, int]]:
    """This rank's shard of the model, in `dtype` on `device`, then quantized as asked; on CPU its
    float linear layers then get oneDNN-prepacked weights (cpu_linear.py)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(parallel.local_config(ckpt.config), parallel)
    model = model.to(dtype).to_empty(device=device)
    if ckpt.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # The GPU path's rotary table must reach every position a sequence can have.
    model.model.rotary.max_positions = max(
        ckpt.config.max_position_embeddings, args.max_model_len or 0
    )
    if isinstance(ckpt, RandomCheckpoint):
        init_random(model, args.seed)
    else:
        model.load_weights(parallel.shard_weights(ckpt.weights(), ckpt.config))
    method = args.quantization
    check_supported(method, device)
    if method == "gguf" and not ckpt.quant_types():
        raise QuantizationError(
            "quantization 'gguf' keeps a GGUF file's quantized tensors; "
            f"{ckpt.path} is not a GGUF file (use int8, int4 or fp8)"
        )
    group = args.quantization_group_size
    if group is None:
        group, why = default_int4_group(ckpt.quant_types())
        if method == "int4" and parallel.rank == 0:
            logger.info("int4 group size %d: %s (--quantization-group-size overrides)", group, why)
    # After sharding: each rank quantizes only its own slice.
    quantized = quantize_model(model, method, group, ckpt.quant_types())
    packed = prepack_linears(model, device, dtype)
    if packed and parallel.rank == 0:
        logger.info(
            "prepacked the float linear layers for oneDNN: %.1f MiB beside the weights "
            "(KVPILOT_CPU_PREPACK=0 turns it off)",
            packed / 2**20,
        )
    return model.eval(), quantized


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """The bytes of one block of the pool ModelRunner allocates: keys and values, every layer."""
    elem = torch.tensor([], dtype=dtype).element_size()
    return (
        2
        * config.num_hidden_layers
        * block_size
        * config.num_key_value_heads
        * config.head_dim
        * elem
    )


def gpu_kv_budget(
    model: LlamaForCausalLM,
    args: EngineArgs,
    max_model_len: int,
    device: torch.device,
    dtype: torch.dtype,
) -> int:
    """What is left of gpu_memory_utilization x the GPU after the weights, the CUDA context,
    any other process, and the peak of the largest step (measured by running it)."""
    peak = profile_peak_memory(
        model,
        args.max_num_batched_tokens,
        args.max_num_seqs,
        max_model_len,
        args.block_size,
        device,
        dtype,
    )
    free, total = torch.cuda.mem_get_info(device)
    budget = int(total * args.gpu_memory_utilization) - (total - free) - peak
    if budget <= 0:
        raise ValueError(
            f"no GPU memory left for the KV cache: {(total - free) / 2**30:.1f} GiB in use, "
            f"{peak / 2**30:.1f} GiB for the largest step, "
            f"gpu_memory_utilization={args.gpu_memory_utilization} of "
            f"{total / 2**30:.1f} GiB; raise it or lower max_num_batched_tokens"
        )
    return budget


@torch.inference_mode()
def profile_peak_memory(
    model: LlamaForCausalLM,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    max_model_len: int,
    block_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> int:
    """Peak bytes the largest step takes on top of what is allocated now (the weights): a
    prefill of max_num_batched_tokens (as sequences no longer than max_model_len) over a
    one-block cache, nothing stored, then logits and a sort for max_num_seqs rows as the
    sampler does. The KV pool gets what is left under gpu_memory_utilization."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    runner = ModelRunner(model, model.config, 1, block_size, device, dtype)
    step = StepInput()
    left = max_num_batched_tokens
    while left > 0:
        n = min(left, max_model_len)
        step.input_ids.extend([0] * n)
        step.positions.extend(range(n))
        step.slots.extend([-1] * n)
        step.query_start_loc.append(step.query_start_loc[-1] + n)
        step.context_lens.append(n)
        step.block_tables.append([0] * -(-n // block_size))
        step.prefill_seqs.append(len(step.context_lens) - 1)
        left -= n
    total = len(step.input_ids)
    step.sample_rows = list(range(max(0, total - max_num_seqs), total))
    logits = runner.run(step)
    assert logits is not None
    logits.float().softmax(dim=-1).sort(dim=-1, descending=True)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del runner, logits
    torch.cuda.empty_cache()
    return peak


# ---- ranks 1..n-1: the processes, the process group, the rank loop -----------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(rank: int, size: int, port: int, device: torch.device) -> None:
    if torch.distributed.is_initialized():
        raise RuntimeError(
            "torch.distributed is already initialised in this process: only one tensor-parallel "
            "engine can run per process (shut the other one down first)"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        timeout=COLLECTIVE_TIMEOUT,
    )


class WorkerGroup:
    """Ranks 1..size-1 as child processes, each driven over its own socket pair.

    Each rank is a fresh `python -m kvpilot_engine.tp_rank` rather than a multiprocessing child:
    spawn re-imports the user's main module (a script without an `if __name__ == "__main__":`
    guard would build its own engine inside the rank and die), and fork copies a process whose
    OpenMP pool may already run. The first message a rank receives names what to run; the
    target is `target(rank, size, port, conn, *args)`: it must answer ("ready",) or
    ("error", message) once its shard is loaded, then serve messages until ("shutdown",) or the
    end of its socket (this process died)."""

    def __init__(self, target: Callable[..., None], size: int, port: int, args: tuple[Any, ...]):
        self.conns: list[Connection] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self._closed = False
        env = dict(os.environ)
        # The child must import this very package, wherever the parent found it.
        package_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        for rank in range(1, size):
            ours, theirs = socket.socketpair()
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "kvpilot_engine.tp_rank", str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),),
                    env=env,
                    stdin=subprocess.DEVNULL,
                )
            finally:
                theirs.close()  # so a dead rank shows here as EOF on our end
            conn = Connection(ours.detach())
            self.conns.append(conn)
            self.procs.append(proc)
            conn.send((target.__module__, target.__qualname__, (rank, size, port, *args)))

    def wait_ready(self) -> None:
        for rank, (conn, proc) in enumerate(zip(self.conns, self.procs, strict=True), start=1):
            while not conn.poll(0.5):
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"tensor-parallel rank {rank} exited (code {proc.returncode}) while loading"
                    )
            try:
                msg = conn.recv()
            except EOFError:
                raise RuntimeError(f"tensor-parallel rank {rank} exited while loading") from None
            if msg[0] == "error":
                raise RuntimeError(f"tensor-parallel rank {rank} failed to load: {msg[1]}")

    def send(self, msg: tuple[Any, ...]) -> None:
        for conn in self.conns:
            conn.send(msg)

    def send_step(self, step: StepInput) -> None:
        """Rank 0's ModelRunner calls this before each forward pass, which every rank runs."""
        self.send(("step", step))

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        for conn in self.conns:
            with contextlib.suppress(OSError, EOFError):  # already gone
                conn.send(("shutdown",))
        for proc in self.procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:  # stuck in a collective whose peer is gone
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for conn in self.conns:
            conn.close()


def _tensor_parallel_worker(
    rank: int, size: int, port: int, conn: Any, args: EngineArgs, model_path: str
) -> None:
    """Ranks 1..size-1: load the shard, then run every step rank 0 sends, until told to stop or
    until rank 0's end of the pipe closes."""
    if os.environ.get("OMP_NUM_THREADS") is None:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    try:
        device = rank_device(args, rank)
        ckpt = load_checkpoint(model_path)
        dtype = resolve_dtype(args.dtype, ckpt.config.torch_dtype, device)
        model, _ = load_model(ckpt, args, dtype, device, Parallel.for_rank(ckpt.config, rank, size))
    except Exception as e:
        with contextlib.suppress(OSError):  # rank 0 may be gone already
            conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    try:
        conn.send(("ready",))
    except OSError:  # rank 0 died while we loaded
        return
    init_distributed(rank, size, port, device)
    try:
        msg = conn.recv()
        if msg[0] != "init":
            return
        runner = ModelRunner(model, model.config, msg[1], args.block_size, device, dtype, args.seed)
        while True:
            msg = conn.recv()
            if msg[0] != "step":
                return
            runner.run(msg[1])
    except (EOFError, OSError, KeyboardInterrupt):  # rank 0 is gone
        return
    finally:
        torch.distributed.destroy_process_group()


def _stop_tensor_parallel(workers: WorkerGroup) -> None:
    workers.shutdown()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
