"""Running many configs with a cache, and the aggregation every study shares."""

from __future__ import annotations

import atexit
import hashlib
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

from .tasks import Dataset, load_task
from .train import run


def config_key(cfg: dict[str, Any]) -> str:
    """A run's cache key. ``schedule="cosine"`` is the default that runs before the option
    existed were trained with, so it hashes as if absent: their committed results stay cached."""
    cfg = {k: v for k, v in cfg.items() if not (k == "schedule" and v == "cosine")}
    return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


class Runner:
    """Runs configs, caching each finished run as ``OUT/cache/<key>.json`` (resumable); ``jobs`` > 1
    trains that many runs at once in worker processes of one thread each.

    Runs already in a committed results file (``results_dir/STUDY.json``, as ``neumann-repro`` writes
    them) count as cached too: a fresh clone re-renders the documented studies without training.
    """

    def __init__(
        self,
        out: Path,
        device: str = "cpu",
        data_dir: Path | None = None,
        progress: bool = True,
        results_dir: Path | None = None,
        jobs: int = 1,
    ):
        self.out = Path(out)
        self.jobs = jobs
        self.results_dir = Path(results_dir) if results_dir is not None else None
        self._known: dict[str, dict[str, Any]] | None = None
        self.device = torch.device(device)
        self.data_dir = data_dir
        self.progress = progress
        self.cache_dir = self.out / "cache"  # created by the first run that stores a result
        self._pool: ProcessPoolExecutor | None = None  # worker processes, kept across rounds
        # where the runs of this runner came from (their keys): trained now, the run cache, the committed results
        self.served: dict[str, set[str]] = {"trained": set(), "cache": set(), "committed": set()}

    def close(self) -> None:
        """Shut the worker processes down (a study's many small rounds reuse them until then)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def _workers(self) -> ProcessPoolExecutor:
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked thread pools
            self._pool = ProcessPoolExecutor(self.jobs, mp_context=ctx, initializer=_worker_init)
            atexit.register(self.close)
        return self._pool

    def data(self, task: str) -> Dataset:
        return _dataset(task, str(self.out / "data"), self.data_dir)

    def known_payload(self, study: str) -> dict[str, Any] | None:
        """The committed results file of ``study``, if there is one."""
        if self.results_dir is None:
            return None
        path = self.results_dir / f"{study}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def _committed_runs(self) -> dict[str, dict[str, Any]]:
        if self._known is None:
            self._known = {}
            if self.results_dir is not None and self.results_dir.is_dir():
                for path in sorted(self.results_dir.glob("*.json")):
                    for r in json.loads(path.read_text()).get("runs", []):
                        rec = {k: v for k, v in r.items() if k not in ("cell", "cells")}
                        self._known[config_key(rec["config"])] = rec
        return self._known

    def run_all(self, configs: list[dict[str, Any]], desc: str = "runs") -> list[dict[str, Any]]:
        results: list[dict[str, Any] | None] = []
        todo = []
        known = self._committed_runs()
        for cfg in configs:
            key = config_key(cfg)
            path = self.cache_dir / f"{key}.json"
            cached = _read_cached(path) if path.exists() else None
            if cached is not None:
                results.append(cached)
                if key not in self.served["trained"]:  # (a later round of a tuning reads its own runs back)
                    self.served["cache"].add(key)
            elif key in known:
                results.append(known[key])
                self.served["committed"].add(key)
            else:
                results.append(None)
                todo.append((len(results) - 1, cfg, path))
        if todo:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.served["trained"].update(config_key(cfg) for _, cfg, _ in todo)
        bar = progress(len(todo), desc, self.progress and bool(todo))

        def store(i: int, path: Path, res: dict[str, Any]) -> None:
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(res))
            tmp.replace(path)  # atomic: an interrupted run leaves no half-written result
            results[i] = res
            bar.update(1)

        if self.jobs > 1 and len(todo) > 1:
            pool = self._workers()
            futures = {
                pool.submit(_run_in_worker, cfg, str(self.out / "data"), self.data_dir, str(self.device)): (i, p)
                for i, cfg, p in todo
            }
            try:
                for fut in as_completed(futures):
                    store(*futures[fut], fut.result())
            except BaseException:  # Ctrl-C or a failed run: no worker goes on training
                self.close()
                raise
        else:
            for i, cfg, path in todo:
                store(i, path, run(cfg, self.data(cfg["task"]), self.device))
        bar.close()
        return [r for r in results if r is not None]


def _read_cached(path: Path) -> dict[str, Any] | None:
    """A cached run, or ``None`` (with one line on stderr naming the file) where the file cannot be
    read as one: what a crash, a full disk or a hand edit leaves behind. The run is then trained
    again and the file replaced."""
    try:
        res = json.loads(path.read_text())
        if not isinstance(res, dict) or not isinstance(res.get("config"), dict) or "history" not in res:
            raise ValueError("not a finished run")
        return res
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        reason = type(e).__name__ if not str(e) else f"{type(e).__name__}: {str(e)[:80]}"
        print(f"neumann-repro: unreadable cached run {path} ({reason}); training it again", file=sys.stderr)
        return None


_DATA: dict[tuple[str, str, Path | None], Dataset] = {}


def _dataset(task: str, cache: str, data_dir: Path | None) -> Dataset:
    """A task's data, loaded once per process (the main one and each worker)."""
    key = (task, cache, data_dir)
    if key not in _DATA:
        _DATA[key] = load_task(task, Path(cache), data_dir)
    return _DATA[key]


def _worker_init() -> None:
    torch.set_num_threads(1)  # one core per worker: --jobs N uses N cores


def _run_in_worker(cfg: dict[str, Any], cache: str, data_dir: Path | None, device: str) -> dict[str, Any]:
    return run(cfg, _dataset(cfg["task"], cache, data_dir), torch.device(device))


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, desc: str, enabled: bool, unit: str = "run") -> Any:
    """A progress bar that says what it counts (``desc``), or nothing when off or empty."""
    if not enabled or total == 0:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
