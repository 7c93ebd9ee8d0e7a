"""How much memory a batch needs on the compiled runtime, and how much there is.

``audit export`` measures each graph on the CPU while validating it: the peak RSS of one call above the RSS
before it, at the validation batches (1 and 3 rows), in a session without onnxruntime's arena so that each call's
own transient is what is seen. export.json keeps ``base_mib`` + ``per_item_mib`` per graph. A batch of ``n`` rows
then needs about ``base + n * per_item`` during that graph's call, and, since graphs this large run without the
arena (``RuntimeOptions.small``), gives it back afterwards: a features batch needs the largest of its
graphs' needs, not their sum. Before featurising, ``check_batch_fits`` compares that with the memory available
to this process (the machine's MemAvailable and, inside a memory cgroup, what its limit leaves); the gray-box
tier's UNet rows per call are capped to what fits (``fit_graybox_rows``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

MIB = 2**20
# Keep this share of the available memory free: page cache, allocator slack, what the estimate misses.
HEADROOM = 0.85


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def release_free_heap() -> None:
    """Hand glibc's cached free heap back to the OS, so it is not reused unseen by the call being measured."""
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def measure_peak(fn: Callable[[], object], interval: float = 0.002) -> tuple[object, int | None, float]:
    """(fn's result, its peak RSS above the RSS before it in bytes or None where Linux cannot tell, seconds).

    RSS is sampled from another thread while ``fn`` runs (onnxruntime releases the GIL) rather than read from the
    kernel's high-water mark: resetting that mark (``/proc/self/clear_refs``) would also reset the process's
    ``ru_maxrss``, which benchmarks and ``time -v`` report as the peak of the whole run."""
    import threading

    release_free_heap()
    before = _status_kib("VmRSS")
    peak = [before or 0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            now = _status_kib("VmRSS")
            if now is not None and now > peak[0]:
                peak[0] = now
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        result = fn()
    finally:
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    after = _status_kib("VmRSS")
    if before is None or after is None:
        return result, None, seconds
    return result, max(0, max(peak[0], after) - before) * 1024, seconds


def linear_fit(rows: list[int], peaks: list[int]) -> dict:
    """``base_mib`` + ``per_item_mib`` per row through the measured peaks (largest batch last)."""
    if len(rows) < 2 or rows[-1] == rows[0]:
        per = peaks[-1] / max(rows[-1], 1)
        return {"base_mib": 0.0, "per_item_mib": round(per / MIB, 2)}
    per = max(0.0, (peaks[-1] - peaks[0]) / (rows[-1] - rows[0]))
    base = max(0.0, peaks[-1] - per * rows[-1])
    return {"base_mib": round(base / MIB, 2), "per_item_mib": round(per / MIB, 2)}


def graph_need(record: dict | None, rows: int) -> int | None:
    """Bytes one call of a graph (its export.json record) needs at ``rows`` rows; None when it was not measured."""
    mem = (record or {}).get("memory")
    if not mem or rows <= 0:
        return None if not mem else 0
    return int((mem["base_mib"] + mem["per_item_mib"] * rows) * MIB)


def largest_need(graphs: dict, rows: dict[str, int]) -> tuple[int, str] | None:
    """(bytes, graph name) of the most demanding call among ``rows`` (graph name -> rows per call); None when any
    of those graphs has no measurement (an export made before they were recorded)."""
    needs = {name: graph_need(graphs.get(name), n) for name, n in rows.items() if name in graphs}
    if not needs or any(v is None for v in needs.values()):
        return None
    name = max(needs, key=needs.get)
    return needs[name], name


def _cgroup_room() -> int | None:
    """What this process's memory cgroup (v2 or v1) still allows, counting its reclaimable page cache as room."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":  # v2
            base = Path("/sys/fs/cgroup") / rel.lstrip("/")
            limit, usage, stat = base / "memory.max", base / "memory.current", base / "memory.stat"
            cache_key = "inactive_file"
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / rel.lstrip("/")
            limit, usage, stat = base / "memory.limit_in_bytes", base / "memory.usage_in_bytes", base / "memory.stat"
            cache_key = "total_inactive_file"
        else:
            continue
        try:
            raw = limit.read_text().strip()
            if raw == "max" or int(raw) >= 2**60:
                continue
            cache = 0
            for entry in stat.read_text().splitlines():
                key, _, value = entry.partition(" ")
                if key == cache_key:
                    cache = int(value)
            return int(raw) - int(usage.read_text()) + cache
        except (OSError, ValueError):
            continue
    return None


def available_bytes() -> int | None:
    """Memory this process can still take: MemAvailable, or less where a cgroup limit leaves less."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    room = _cgroup_room()
    if room is not None:
        avail = room if avail is None else min(avail, room)
    return avail


def gib(n: int | float) -> str:
    return f"{n / 2**30:.1f} GiB"


# --- a features batch ----------------------------------------------------------------------------------------------

MAX_AUTO_BATCH = 64  # the largest --batch-size auto picks
DEFAULT_BATCH = 8  # what auto picks where nothing is measured (the torch path): the features default


def batch_need(models, captions: int, n_gen: int, guidance: float) -> tuple[int, str] | None:
    """(bytes, where) the most demanding model call of one features batch of ``captions`` rows needs beyond what
    is loaded; None unless all three models are compiled with measurements (the torch path has none)."""
    parts = []
    for backend, args in ((models.generator, (captions * n_gen, guidance)),
                          (models.captioner, (captions * n_gen + captions,)),  # + uncaptioned queries at most
                          (models.embedder, (captions * (n_gen + 1),))):
        peak = getattr(backend, "peak_bytes", None)
        found = peak(*args) if peak is not None else None
        if found is None:
            return None
        parts.append(found)
    return max(parts)


def fitting_batch_size(models, n_gen: int, guidance: float, available: int, most: int = MAX_AUTO_BATCH) -> int:
    """The largest batch of captions (up to ``most``) whose need fits ``available`` with the headroom; 0: none."""
    if batch_need(models, 1, n_gen, guidance) is None:
        return most
    return _largest_fitting(lambda b: batch_need(models, b, n_gen, guidance)[0], most, available)


def _largest_fitting(need: Callable[[int], int], most: int, available: int) -> int:
    """The largest n in 1..``most`` whose ``need(n)`` bytes fit ``available`` with the headroom; 0: none."""
    best = 0
    for n in range(1, most + 1):
        if need(n) > HEADROOM * available:
            break
        best = n
    return best


def fit_graybox_rows(denoiser, available: int | None = None) -> None:
    """Cap a compiled denoiser's UNet rows per call (``batch_size``) so that its largest call fits the memory
    available now, from the export's measurements (at SD's 512 px the default 64 rows would need ~26 GiB); raise a
    one-line UsageError when not even one row fits. Rows are independent, so the cap changes no result beyond
    float rounding. Nothing is done where nothing is measured (the torch path)."""
    from ..errors import UsageError

    peak = getattr(denoiser, "peak_bytes", None)
    one = peak(1) if peak is not None else None
    free = available if available is not None else available_bytes()
    if one is None or free is None:
        return
    best = _largest_fitting(lambda rows: peak(rows)[0], int(denoiser.batch_size), free)
    if best == 0:
        raise UsageError(f"gray-box: one UNet evaluation of {denoiser.name} needs about {gib(one[0])} beyond the "
                         f"loaded models ({one[1]}), and {gib(free)} is available; free memory or use a machine "
                         "with more")
    if best < denoiser.batch_size:
        log.info("gray-box: %d UNet rows a call fit in %s (of %d)", best, gib(free), denoiser.batch_size)
        denoiser.batch_size = best


def check_batch_fits(models, batch_size: int, n_gen: int, guidance: float, what: str = "features") -> None:
    """Raise a one-line UsageError before a batch that would not fit: the estimate, the free memory and the
    ``--batch-size`` that fits. Nothing is checked where no estimate exists (torch models)."""
    from ..errors import UsageError

    need = batch_need(models, batch_size, n_gen, guidance)
    free = available_bytes()
    if need is None or free is None or need[0] <= HEADROOM * free:
        return
    fits = fitting_batch_size(models, n_gen, guidance, free, batch_size)
    advice = (f"--batch-size {fits} fits (or pass --batch-size auto)" if fits else
              f"not even one caption at --n-gen {n_gen} fits: free memory or lower --n-gen")
    raise UsageError(f"{what}: a batch of {batch_size} captions ({batch_size * n_gen} generated images) needs about "
                     f"{gib(need[0])} beyond the loaded models ({need[1]}), and {gib(free)} is available; {advice}")


def auto_batch_size(models, n_gen: int, guidance: float) -> int:
    """``--batch-size auto``: the largest batch that fits now (at least 1; the check then explains a misfit)."""
    free = available_bytes()
    if free is None or batch_need(models, 1, n_gen, guidance) is None:
        return DEFAULT_BATCH
    return max(1, fitting_batch_size(models, n_gen, guidance, free))
