"""Spawned gloo ranks for the distributed tests, torn down so that none outlives its test or aborts.

Why the care: importing ``torch._dynamo`` while a process group exists keeps that group alive after
``destroy_process_group()`` (torch 2.13 on CPU: DDP's constructor imports it, so does
``torch.compile``). Gloo's threads (``pt_gloo_runloop``, ``gloo_tcp_loop``) then ran on into
interpreter teardown, where the group was finally destroyed with our DDP comm hook's Python
callbacks still attached to its work objects: a thread that takes the GIL while the interpreter
finalizes is ended by ``pthread_exit``, and in C++ code that is ``terminate called without an active
exception``, a SIGABRT, now and then, depending on timing. Imported before the group is created,
``torch._dynamo`` holds nothing, and ``destroy_process_group()`` joins gloo's threads at once.

:func:`spawn_ranks` does that in every rank, keeps each rank's stderr in a file (with Python's
fault handler on it, so an abort leaves every thread's stack) and, after the group is destroyed,
checks that no gloo thread is left; a failing run's message carries every rank's stderr.
"""

from __future__ import annotations

import faulthandler
import gc
import importlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")
PRELOAD = ["torch._dynamo"]


def gloo_threads() -> list[str]:
    """Names of this process's threads that belong to gloo (Linux: from /proc; elsewhere none)."""
    task = Path("/proc/self/task")
    if not task.is_dir():
        return []
    names = []
    for tid in task.iterdir():
        try:
            names.append((tid / "comm").read_text().strip())
        except OSError:  # (a thread that ended meanwhile)
            continue
    return [n for n in names if n.startswith(GLOO_THREADS)]


def _clear_dtensor_caches() -> None:
    """DTensor's sharding-propagation caches keep the specs of every op they saw, and through
    them the device mesh and its process group: emptied, they let the group go."""
    if "torch.distributed.tensor" not in sys.modules:
        return
    from torch.distributed.tensor import DTensor

    clear_native = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
    if clear_native is not None:  # the C++ fast path's cache (torch 2.10 and later)
        clear_native()
    prop = DTensor._op_dispatcher.sharding_propagator
    for cache in ("propagate_op_sharding", "_propagate_tensor_meta_cached"):
        if hasattr(getattr(prop, cache, None), "cache_clear"):
            getattr(prop, cache).cache_clear()


def _rank_main(rank: int, world: int, fn: Callable[..., Any], args: tuple, tmp: str, pinned: bool) -> None:
    log = open(Path(tmp, f"rank{rank}.stderr"), "w")  # noqa: SIM115 (lives as long as the process)
    os.dup2(log.fileno(), 2)
    faulthandler.enable(file=log, all_threads=True)
    for name in PRELOAD:
        importlib.import_module(name)  # before the group exists (see the module doc)
    dist.init_process_group("gloo", init_method=f"file://{Path(tmp, 'init')}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        _clear_dtensor_caches()
        gc.collect()  # objects of fn's that hold the group (device meshes, DTensors) go first
        dist.destroy_process_group()
    if pinned:  # torch still holds the group: leave without interpreter teardown (see spawn_ranks)
        sys.stderr.flush()
        os._exit(0)
    deadline = time.monotonic() + 10.0
    while gloo_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    if left := gloo_threads():
        raise RuntimeError(f"rank {rank}: gloo threads alive after destroy_process_group: {left}")


def spawn_ranks(fn: Callable[..., Any], world: int, tmp: str | Path, *args: Any, pinned: bool = False) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes on a gloo group (file store in
    ``tmp``), then tear the group down; raise with every rank's stderr if any rank failed or died.

    ``pinned``: FSDP2 with a distributed checkpoint keeps DTensor specs, and through their device
    mesh the group, in torch-internal storage that no public call empties (torch 2.13), so gloo's
    threads outlive ``destroy_process_group()`` there; such ranks skip the thread check and leave
    with ``os._exit(0)`` after every result is written, so that interpreter teardown cannot abort
    them. Every other rank must end with no gloo thread alive."""
    tmp = str(tmp)
    try:
        mp.spawn(_rank_main, args=(world, fn, args, tmp, pinned), nprocs=world, join=True)
    except Exception as exc:
        logs = []
        for rank in range(world):
            path = Path(tmp, f"rank{rank}.stderr")
            text = path.read_text(errors="replace")[-4000:] if path.exists() else "(no log)"
            logs.append(f"--- rank {rank} stderr ---\n{text}")
        raise AssertionError(f"{exc}\n" + "\n".join(logs)) from exc
