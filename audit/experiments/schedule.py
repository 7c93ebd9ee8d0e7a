"""A small dependency-aware task runner: tasks run in worker processes (one torch thread each), longest chain
first, and every task reports its wall and CPU seconds so the study can say where its hour went."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import importlib
import logging
import multiprocessing
import os
import resource
import time
from typing import Any, Callable

from ..errors import AuditError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Task:
    name: str
    fn: str  # "module:function", importable in a fresh process
    args: tuple = ()
    deps: tuple = ()
    cost: float = 1.0  # rough CPU seconds, for ordering only
    stage: str = ""


class TaskFailed(AuditError):
    """A task of the study raised; the message names the task and the error."""


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _init_worker(quiet_libraries: bool = True) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if quiet_libraries:
        from ..progress import silence_libraries

        silence_libraries()
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")


def call(fn: str, args: tuple) -> tuple[Any, float, float]:
    """Run ``fn(*args)``; returns (result, wall seconds, CPU seconds of this process)."""
    module, name = fn.split(":")
    func: Callable = getattr(importlib.import_module(module), name)
    t0, c0 = time.perf_counter(), _cpu()
    result = func(*args)
    return result, time.perf_counter() - t0, _cpu() - c0


def _priorities(tasks: dict[str, Task]) -> dict[str, float]:
    """Cost of the longest chain of tasks starting at each task (critical-path-first ordering)."""
    children: dict[str, list[str]] = {n: [] for n in tasks}
    for t in tasks.values():
        for d in t.deps:
            children[d].append(t.name)
    memo: dict[str, float] = {}

    def chain(n: str) -> float:
        if n not in memo:
            memo[n] = tasks[n].cost + max((chain(c) for c in children[n]), default=0.0)
        return memo[n]

    for n in tasks:
        chain(n)
    return memo


def run_tasks(tasks: list[Task], workers: int = 2, on_done: Callable[[str, dict], None] | None = None) -> dict:
    """Run every task after its dependencies; returns ``{name: {"result", "seconds", "cpu_seconds", "stage"}}``.

    The first failure stops the run (queued tasks are cancelled) and raises TaskFailed naming the task.
    """
    by_name = {t.name: t for t in tasks}
    if len(by_name) != len(tasks):
        raise ValueError("duplicate task names")
    for t in tasks:
        missing = [d for d in t.deps if d not in by_name]
        if missing:
            raise ValueError(f"task {t.name} depends on unknown task(s) {missing}")
    prio = _priorities(by_name)
    done: dict[str, dict] = {}
    pending = set(by_name)

    def ready() -> list[str]:
        return sorted((n for n in pending if all(d in done for d in by_name[n].deps)), key=lambda n: -prio[n])

    def finish(name: str, result, wall: float, cpu: float) -> None:
        done[name] = {"result": result, "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
                      "stage": by_name[name].stage}
        log.info("done %s (%.0f s, %.0f CPU s); %d left", name, wall, cpu, len(pending))
        if on_done is not None:
            on_done(name, done[name])

    if workers <= 1:
        while pending:
            name = ready()[0]
            pending.discard(name)
            try:
                finish(name, *call(by_name[name].fn, by_name[name].args))
            except AuditError as exc:
                raise TaskFailed(f"{name}: {exc}") from exc
        return done

    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker) as pool:
        running: dict[cf.Future, str] = {}
        while pending or running:
            for name in ready():
                if len(running) >= workers:
                    break
                pending.discard(name)
                running[pool.submit(call, by_name[name].fn, by_name[name].args)] = name
            if not running:
                raise ValueError(f"tasks {sorted(pending)} can never run (dependency cycle)")
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                name = running.pop(fut)
                try:
                    finish(name, *fut.result())
                except Exception as exc:
                    for f in running:
                        f.cancel()
                    raise TaskFailed(f"{name}: {type(exc).__name__}: {exc}") from exc
    return done


def simulate(tasks: list[Task], seconds: dict[str, float], workers: int) -> float:
    """Makespan of ``tasks`` on ``workers`` idle cores if each took ``seconds[name]`` (e.g. its measured CPU
    seconds), scheduled by the same rule as ``run_tasks``: what a run would take on a machine nobody else uses."""
    by_name = {t.name: t for t in tasks}
    prio = _priorities(by_name)
    finish: dict[str, float] = {}
    free = [0.0] * max(1, workers)
    pending = set(by_name)
    while pending:
        # The next task to start: among those whose dependencies are finished, the one that can start earliest,
        # ties broken by priority (as the runner picks among ready tasks).
        ready = [n for n in pending if all(d in finish for d in by_name[n].deps)]
        w = min(range(len(free)), key=free.__getitem__)
        start = {n: max([free[w]] + [finish[d] for d in by_name[n].deps]) for n in ready}
        name = min(ready, key=lambda n: (start[n], -prio[n]))
        finish[name] = start[name] + float(seconds.get(name, 0.0))
        free[w] = finish[name]
        pending.discard(name)
    return max(finish.values(), default=0.0)
