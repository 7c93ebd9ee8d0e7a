"""`audit serve` under load on the toy target, side by side in one run: the batched service, the same service
with batching off (--max-batch-size 1), and one `audit check` process per image.

For each service: time to ready, then 1, 4 and 16 concurrent clients on loopback, each posting distinct toy images
with their captions; throughput (checks/s), latency p50/p95/p99, errors, and the server's resident memory after
the warm-up and after every request. The CLI is timed on a few images (each pays the whole start-up).

    python benchmarks/service.py --requests 8 --cli-images 2 --json benchmarks/results/service.json

With ``--memory-requests N`` it runs the memory check instead: the batched service alone, N checks from 16
clients in four quarters, the server's resident memory (VmRSS) after the warm-up and after each quarter. Memory is
called flat when it grows by less than ``--memory-bound-mib`` from the end of the first quarter (by then every
batch size has been seen and the allocators hold their working set) to the end of the run.

    python benchmarks/service.py --memory-requests 2000 --json benchmarks/results/service_memory.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _images(n: int, folder: Path) -> list[tuple[Path, str]]:
    from PIL import Image

    from audit.toy import scenes

    images, captions = scenes.scene_images(11, "members", n)
    out = []
    for i, (im, cap) in enumerate(zip(images, captions)):
        path = folder / f"q{i:04d}.png"
        Image.fromarray(im).save(path)
        out.append((path, cap))
    return out


def _env(home: Path) -> dict:
    return os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "AUDIT_HOME": str(home)}


def _start(args: list[str], home: Path, env: dict | None = None,
           target: str = "toy") -> tuple[subprocess.Popen, str, float]:
    port = _free_port()
    started = time.perf_counter()
    args = args if "--db" in args else ["--db", str(home / "evidence.db"), *args]
    proc = subprocess.Popen([sys.executable, "-m", "audit.cli", "serve", "--target", target, "--port", str(port),
                             *args], env=env or _env(home),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode())
        try:
            if httpx.get(url + "/v2/health/ready", timeout=5).status_code == 200:
                return proc, url, time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def _load(url: str, queries: list[tuple[Path, str]], clients: int, requests: int) -> dict:
    """``requests`` checks from ``clients`` concurrent clients; latency per request, throughput overall."""
    payloads = [(p.name, p.read_bytes(), cap) for p, cap in queries]
    jobs = [payloads[i % len(payloads)] for i in range(requests)]
    latencies, errors = [], 0

    def one(client: httpx.Client, job) -> float:
        name, data, caption = job
        t = time.perf_counter()
        r = client.post("/v1/checks", files={"image": (name, data, "image/png")}, data={"caption": caption})
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code} {r.text}")
        return time.perf_counter() - t

    def worker(k: int) -> list:
        out = []
        with httpx.Client(base_url=url, timeout=600) as client:
            for job in jobs[k::clients]:
                try:
                    out.append(one(client, job))
                except Exception:  # noqa: BLE001 (counted, the run goes on)
                    out.append(None)
        return out

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for result in pool.map(worker, range(clients)):
            latencies += [x for x in result if x is not None]
            errors += sum(x is None for x in result)
    wall = time.perf_counter() - started
    lat = np.array(latencies) * 1000
    pct = {f"p{q}_ms": round(float(np.percentile(lat, q)), 1) if len(lat) else None for q in (50, 95, 99)}
    return {"clients": clients, "requests": requests, "errors": errors, "seconds": round(wall, 2),
            "checks_per_s": round(len(latencies) / wall, 3), **pct}


def bench_service(name: str, args: list[str], queries, levels: list[int], requests: int, work: Path) -> dict:
    home = work / name
    home.mkdir()
    proc, url, ready = _start(args, home)
    try:
        _load(url, queries[:2], 1, 2)  # warm-up: first calls allocate the models' buffers
        rss = [_rss_mib(proc.pid)]
        runs = []
        for clients in levels:
            runs.append(_load(url, queries, clients, max(requests, clients)))
            rss.append(_rss_mib(proc.pid))
            print(f"{name:>10} {clients:>3} clients: {runs[-1]['checks_per_s']:.2f} checks/s, p50 "
                  f"{runs[-1]['p50_ms']} ms, errors {runs[-1]['errors']}", flush=True)
        return {"time_to_ready_s": round(ready, 2), "runs": runs, "rss_mib_after_warmup": round(rss[0], 1),
                "rss_mib_after_each_level": [round(x, 1) for x in rss[1:]],
                "requests_total": 2 + sum(max(requests, c) for c in levels)}
    finally:
        proc.terminate()
        proc.wait(60)


def bench_memory(args: list[str], queries, n: int, clients: int, bound_mib: float, work: Path) -> dict:
    """``n`` checks from ``clients`` clients in four quarters; the server's RSS after the warm-up and each quarter."""
    home = work / "memory"
    home.mkdir()
    proc, url, ready = _start(args, home)
    try:
        _load(url, queries[:2], 1, 2)
        rss, quarters = [_rss_mib(proc.pid)], []
        print(f"    memory start: {rss[0]:.0f} MiB", flush=True)
        for q in range(4):
            quarters.append(_load(url, queries, clients, n // 4 + (q < n % 4)))
            rss.append(_rss_mib(proc.pid))
            print(f"    memory quarter {q + 1}: {quarters[-1]['requests']} requests, "
                  f"{quarters[-1]['checks_per_s']:.2f} checks/s, errors {quarters[-1]['errors']}, RSS {rss[-1]:.0f} "
                  f"MiB", flush=True)
        growth = rss[4] - rss[1]
        return {"time_to_ready_s": round(ready, 2), "requests": n, "clients": clients,
                "rss_mib_start": round(rss[0], 1), "rss_mib_after_each_quarter": [round(x, 1) for x in rss[1:]],
                "growth_mib_after_first_quarter": round(growth, 1), "bound_mib": bound_mib,
                "flat": bool(growth < bound_mib), "errors": sum(r["errors"] for r in quarters), "quarters": quarters}
    finally:
        proc.terminate()
        proc.wait(60)


def bench_cli(queries, n: int, work: Path) -> dict:
    times = []
    for path, caption in queries[:n]:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "audit.cli", "check", str(path), "--caption", caption, "--target",
                        "toy", "--json"], env=_env(work / "cli"), check=True, capture_output=True)
        times.append(time.perf_counter() - t)
        print(f"       cli   1 process: {times[-1]:.1f} s", flush=True)
    return {"images": n, "seconds_each": [round(t, 2) for t in times],
            "checks_per_s": round(n / sum(times), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32, help="Checks per concurrency level and service (at least "
                    "one per client).")
    ap.add_argument("--clients", default="1,4,16", help="Concurrency levels.")
    ap.add_argument("--cli-images", type=int, default=3, help="Images checked by one `audit check` process each.")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=20)
    ap.add_argument("--memory-requests", type=int, default=0, help="Run the memory check instead: this many "
                    "checks from 16 clients to the batched service, RSS after each quarter.")
    ap.add_argument("--memory-bound-mib", type=float, default=64, help="Largest RSS growth from the first quarter's "
                    "end to the run's end still called flat.")
    ap.add_argument("--json", type=Path, help="Write the results here.")
    a = ap.parse_args()
    levels = [int(x) for x in a.clients.split(",")]
    with tempfile.TemporaryDirectory(prefix="audit-bench-service-") as tmp:
        work = Path(tmp)
        (work / "q").mkdir()
        (work / "cli").mkdir()
        queries = _images(max(32, a.cli_images), work / "q")
        if a.memory_requests:
            result = {"memory": bench_memory(["--max-batch-size", str(a.max_batch_size), "--max-wait-ms",
                                              str(a.max_wait_ms), "--queue-size", "256"], queries,
                                             a.memory_requests, 16, a.memory_bound_mib, work),
                      "settings": {"max_batch_size": a.max_batch_size, "max_wait_ms": a.max_wait_ms,
                                   "cpus": os.cpu_count(), "load_average": [round(x, 1) for x in os.getloadavg()]}}
            print(memory_markdown(result))
            if a.json:
                a.json.parent.mkdir(parents=True, exist_ok=True)
                a.json.write_text(json.dumps(result, indent=2) + "\n")
            return
        result = {
            "batched": bench_service("batched", ["--max-batch-size", str(a.max_batch_size), "--max-wait-ms",
                                                 str(a.max_wait_ms), "--queue-size", "256"],
                                     queries, levels, a.requests, work),
            "unbatched": bench_service("unbatched", ["--max-batch-size", "1", "--queue-size", "256"], queries,
                                       levels, a.requests, work),
            "cli": bench_cli(queries, a.cli_images, work),
            "settings": {"requests": a.requests, "clients": levels, "max_batch_size": a.max_batch_size,
                         "max_wait_ms": a.max_wait_ms, "cpus": os.cpu_count(),
                         "load_average": [round(x, 1) for x in os.getloadavg()]},
        }
    print(markdown(result))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2) + "\n")


def markdown(result: dict) -> str:
    cli = result["cli"]["checks_per_s"]
    lines = ["| clients | batched checks/s | p50 / p95 / p99 ms | unbatched checks/s | p50 / p95 / p99 ms | "
             "batched ÷ unbatched | batched ÷ CLI |", "|---|---|---|---|---|---|---|"]
    for b, u in zip(result["batched"]["runs"], result["unbatched"]["runs"]):
        lines.append(f"| {b['clients']} | {b['checks_per_s']:.2f} | {b['p50_ms']:.0f} / {b['p95_ms']:.0f} / "
                     f"{b['p99_ms']:.0f} | {u['checks_per_s']:.2f} | {u['p50_ms']:.0f} / {u['p95_ms']:.0f} / "
                     f"{u['p99_ms']:.0f} | {b['checks_per_s'] / u['checks_per_s']:.1f}x | "
                     f"{b['checks_per_s'] / cli:.0f}x |")
    errors = sum(r["errors"] for k in ("batched", "unbatched") for r in result[k]["runs"])
    bat = result["batched"]
    lines.append("")
    lines.append(f"One `audit check` process per image: {cli:.3f} checks/s "
                 f"({', '.join(f'{s:.1f}' for s in result['cli']['seconds_each'])} s each). Errors: {errors}. "
                 f"Time to ready: batched {bat['time_to_ready_s']:.1f} s, unbatched "
                 f"{result['unbatched']['time_to_ready_s']:.1f} s. Batched server RSS: "
                 f"{bat['rss_mib_after_warmup']:.0f} MiB after warm-up, "
                 f"{' / '.join(f'{x:.0f}' for x in bat['rss_mib_after_each_level'])} MiB after each level "
                 f"({bat['requests_total']} requests).")
    return "\n".join(lines)


def memory_markdown(result: dict) -> str:
    m = result["memory"]
    rates = ", ".join(f"{q['checks_per_s']:.2f}" for q in m["quarters"])
    return (f"{m['requests']} checks from {m['clients']} clients, {m['errors']} errors; server RSS "
            f"{m['rss_mib_start']:.0f} MiB after warm-up, "
            f"{' / '.join(f'{x:.0f}' for x in m['rss_mib_after_each_quarter'])} MiB after each quarter: "
            f"{m['growth_mib_after_first_quarter']:+.0f} MiB from the first quarter's end "
            f"({'flat' if m['flat'] else 'NOT flat'}: bound {m['bound_mib']:.0f} MiB); checks/s per quarter {rates}; "
            f"load average at the end {', '.join(str(x) for x in result['settings']['load_average'])}.")


if __name__ == "__main__":
    main()
