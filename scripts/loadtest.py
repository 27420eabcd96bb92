"""Bounded local load test of `fetalplanes serve`: latency percentiles and throughput.

Starts the server for a RUN folder on a free loopback port (a separate process, as in
production), sends a fixed number of requests with a fixed concurrency, prints p50/p95
latency and throughput, and stops the server. It only ever talks to 127.0.0.1.

    .venv/bin/python scripts/loadtest.py runs/train/efficientnet_lite0
    .venv/bin/python scripts/loadtest.py RUN --requests 200 --concurrency 20 --files 1
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

HOST = "127.0.0.1"  # loopback only, by design
SERVE = "import sys; from fetalplanes.cli import app; sys.argv[0] = 'fetalplanes'; app()"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run", type=Path, help="run folder from `fetalplanes train`")
    p.add_argument("--requests", type=int, default=200, help="requests to send (default 200)")
    p.add_argument("--concurrency", type=int, default=20, help="requests in flight (default 20)")
    p.add_argument("--files", type=int, default=1, help="images per request (default 1)")
    p.add_argument("--images", type=Path, help="folder of images to send (default: synthetic)")
    p.add_argument("--max-concurrency", type=int, default=2, help="server --max-concurrency")
    p.add_argument("--max-batch", type=int, default=8, help="server --max-batch")
    p.add_argument("--explain", action="store_true", help="ask for heat maps too")
    p.add_argument("--timeout", type=float, default=600, help="give up after this many seconds")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    if min(args.requests, args.concurrency, args.files, args.max_concurrency, args.max_batch) < 1:
        p.error("--requests, --concurrency, --files and the server options must be at least 1")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def synthetic_images(n: int = 8) -> list[tuple[str, bytes]]:
    """Ultrasound-like phantoms of each plane, as PNG bytes (no files needed)."""
    from PIL import Image

    from fetalplanes.data.synth import SEED4, render_phantom

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(render_phantom(SEED4[i % len(SEED4)], rng)).save(buf, "PNG")
        out.append((f"synthetic_{i}.png", buf.getvalue()))
    return out


def folder_images(folder: Path) -> list[tuple[str, bytes]]:
    from fetalplanes.data.images import list_images

    files = list_images([folder])
    if not files:
        sys.exit(f"error: no images in {folder}")
    return [(f.name, f.read_bytes()) for f in files[:64]]


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-c", SERVE, "serve", str(args.run), "--host", HOST]
    cmd += ["--port", str(port), "--max-concurrency", str(args.max_concurrency)]
    cmd += ["--max-batch", str(args.max_batch)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def wait_ready(client: httpx.AsyncClient, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            err = server.stderr.read().decode(errors="replace") if server.stderr else ""
            sys.exit(f"error: server exited ({server.returncode}): {err.strip()[-500:]}")
        try:
            if (await client.get("/healthz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.25)
    sys.exit("error: server did not become ready within 180 s")


async def one_request(
    client: httpx.AsyncClient, files: list[tuple[str, bytes]], explain: bool
) -> tuple[float, int]:
    parts = [("files", (name, data, "image/png")) for name, data in files]
    t0 = time.perf_counter()
    try:
        r = await client.post("/api/v1/predict", params={"explain": explain}, files=parts)
        status = r.status_code
    except httpx.HTTPError:
        status = 0  # transport failure
    return time.perf_counter() - t0, status


async def load(
    args: argparse.Namespace,
    server: subprocess.Popen[bytes],
    base: str,
    images: list[tuple[str, bytes]],
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120) as client:
        await wait_ready(client, server)
        for i in range(3):  # warm up: first calls allocate, later ones are steady state
            await one_request(client, [images[i % len(images)]], False)
        sem = asyncio.Semaphore(args.concurrency)

        async def worker(i: int) -> tuple[float, int]:
            batch = [images[(i * args.files + k) % len(images)] for k in range(args.files)]
            async with sem:
                return await one_request(client, batch, args.explain)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(worker(i) for i in range(args.requests)))
        wall = time.perf_counter() - t0
        health = (await client.get("/healthz")).json()
    return summarise(args, results, wall, health)


def summarise(
    args: argparse.Namespace, results: list[tuple[float, int]], wall: float, health: dict
) -> dict[str, Any]:
    lat = sorted(t for t, _ in results)
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
    stats = health.get("inference", {})
    return {
        "run": str(args.run),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "images_per_request": args.files,
        "server_max_concurrency": args.max_concurrency,
        "server_max_batch": args.max_batch,
        "explain": args.explain,
        "status_codes": dict(Counter(s for _, s in results)),
        "p50_ms": round(1000 * q[49], 1),
        "p95_ms": round(1000 * q[94], 1),
        "p99_ms": round(1000 * q[98], 1),
        "mean_ms": round(1000 * statistics.fmean(lat), 1),
        "wall_s": round(wall, 2),
        "requests_per_s": round(args.requests / wall, 1),
        "images_per_s": round(args.requests * args.files / wall, 1),
        "mean_batch": round(stats["files"] / stats["batches"], 2) if stats.get("batches") else None,
        "largest_batch": stats.get("largest_batch"),
        "cpu_count": os.cpu_count(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.run / "model.json").is_file():
        sys.exit(f"error: {args.run} is not a run folder (no model.json)")
    images = folder_images(args.images) if args.images else synthetic_images()
    port = free_port()
    server = start_server(args, port)
    try:
        job = load(args, server, f"http://{HOST}:{port}", images)
        summary = asyncio.run(asyncio.wait_for(job, args.timeout))
    except asyncio.TimeoutError:
        sys.exit(f"error: load test did not finish within {args.timeout:.0f} s")
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        width = max(map(len, summary))
        for key, value in summary.items():
            print(f"{key:<{width}}  {value}")
    ok = summary["status_codes"].get(200, 0)
    return 0 if ok == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
