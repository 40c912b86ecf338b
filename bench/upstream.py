"""One 4K PNG from the mock upstream: our UpstreamClient against the official openai SDK.

    python bench/upstream.py              # 9 timed runs per client and mode, 3 traced
    python bench/upstream.py --quick      # 3 timed, 1 traced (well under a minute)
    python bench/upstream.py --image mock # the mock's own (small, smooth) image instead

The mock upstream runs in its own process (`python -m bot mock-upstream --mode b64|url` with
its options, on 127.0.0.1, no added latency). By default it runs with `--noisy-images`, so a
3840x2160 PNG carries photo-like grain and weighs what gpt-image results do (~25 MB, ~33 MB as
base64); `--image mock` keeps its smooth gradient (~0.3 MB).

Each measurement is a fresh client process that first makes one small 1024x1024 call (to
open the connection and warm the code paths: the SDK builds its models lazily), then times
one 3840x2160 call that ends with the image's bytes in hand:

  ours         UpstreamClient.generate, stream off (JSON read in chunks, base64 decoded as it
               arrives; url results downloaded)
  openai SDK   AsyncOpenAI(...).images.generate(model, prompt, size) + base64.b64decode of
               data[0].b64_json; in url mode the SDK returns the url, fetched with httpx
  ours stream  UpstreamClient.generate with stream on (SSE, 2 partial previews; extra row)

Memory is the growth during that one call, with one image in flight: the tracemalloc peak
(Python allocations; from separate traced runs, since tracing slows the call) and the RSS
peak over the RSS before the call (the peak mark VmHWM, i.e. ru_maxrss of this process alone,
reset just before the call; untraced runs).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from _common import (
    MB,
    machine,
    median,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    table,
    verdict,
)

WIDTH, HEIGHT = 3840, 2160
SIZE = f"{WIDTH}x{HEIGHT}"
WARM_SIZE = "1024x1024"
PROMPT = "a harbour at dusk, bench"
API_KEY = "sk-bench-not-a-real-key"
CLIENTS = ("ours", "sdk", "ours-stream")
LABELS = {"ours": "ours", "sdk": "openai SDK", "ours-stream": "ours, streamed"}
MODES = ("b64", "url")
GOAL_TIME = 1.0
GOAL_MEMORY = 0.6
SERVER_START_TIMEOUT = 30.0
MEASURE_TIMEOUT = 120.0


# --- the noisy image and the server process ---


@dataclass
class Server:
    """A mock upstream process and where it listens."""

    name: str
    process: subprocess.Popen[bytes]
    base_url: str
    log: Path


def start_server(name: str, mode: str, stream: bool, noisy: bool, tmp: Path) -> Server:
    """Start one mock upstream process on a free loopback port and wait for its URL."""
    mock_args = ["--host", "127.0.0.1", "--port", "0", "--mode", mode]
    if not stream:
        mock_args.append("--no-stream")
    if noisy:
        mock_args.append("--noisy-images")
    command = [sys.executable, "-m", "bot", "mock-upstream", *mock_args]
    log = tmp / f"server-{name}.log"
    with log.open("wb") as err:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err)
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    line = b""
    while not line.endswith(b"\n") and time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if selector.select(timeout=0.2):
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                break
            line += chunk
    selector.close()
    url = line.decode().strip().splitlines()[0] if line.strip() else ""
    if not url.startswith("http://127.0.0.1:"):
        process.kill()
        raise RuntimeError(f"mock upstream {name} did not start:\n{log.read_text()[-2000:]}")
    return Server(name, process, url, log)


def warm_server(server: Server) -> int:
    """One 4K request so the server's render cache is hot before any measurement."""
    response = httpx.post(
        f"{server.base_url}/v1/images/generations",
        json={"model": "gpt-image-2", "prompt": PROMPT, "size": SIZE},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    response.raise_for_status()
    return len(response.content)


# --- one measurement, in a fresh process ---


async def measure(client: str, base_url: str, trace: bool) -> dict[str, Any]:
    """Warm up, then time one 4K call and the memory it needed; the child's result."""
    call, close = _make_call(client, base_url)
    try:
        await call(WARM_SIZE)
        gc.collect()
        if trace:
            tracemalloc.start()
        reset_ok = reset_peak_rss()
        rss_before = rss_bytes()
        peak_before = peak_rss_bytes()
        started = time.perf_counter()
        data = await call(SIZE)
        elapsed = time.perf_counter() - started
        peak_after = peak_rss_bytes()
        traced_peak = tracemalloc.get_traced_memory()[1] if trace else 0
        tracemalloc.stop()
        if not data.startswith(b"\x89PNG\r\n\x1a\n"):
            raise RuntimeError(f"{client}: the result is not a PNG")
        return {
            "client": client,
            "seconds": elapsed,
            "bytes": len(data),
            "traced_peak": traced_peak,
            # With the mark reset, the peak during the call minus what was resident before;
            # without it, only growth of the lifetime peak can be seen.
            "rss_growth": peak_after - (rss_before if reset_ok else peak_before),
            "rss_reset": reset_ok,
        }
    finally:
        await close()


def _make_call(client: str, base_url: str) -> tuple[Any, Any]:
    if client == "sdk":
        import openai

        sdk = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0)
        downloads = httpx.AsyncClient()

        async def sdk_call(size: Any) -> bytes:
            answer = await sdk.images.generate(model="gpt-image-2", prompt=PROMPT, size=size)
            item = answer.data[0] if answer.data else None
            if item is not None and item.b64_json:
                return base64.b64decode(item.b64_json)
            if item is None or not item.url:
                raise RuntimeError("the SDK returned neither b64_json nor url")
            response = await downloads.get(item.url)
            response.raise_for_status()
            return response.content

        async def sdk_close() -> None:
            await sdk.close()
            await downloads.aclose()

        return sdk_call, sdk_close

    from bot.config import ProviderConfig
    from bot.upstream import ImageRequest, UpstreamClient

    provider = ProviderConfig(
        name="bench",
        api_base=base_url,
        api_key=API_KEY,
        model="gpt-image-2",
        stream=client == "ours-stream",
        max_retries=0,
    )
    ours = UpstreamClient(provider)

    async def our_call(size: str) -> bytes:
        result = await ours.generate(ImageRequest(prompt=PROMPT, size=size))
        return result.images[0].data

    return our_call, ours.aclose


def run_child(client: str, base_url: str, trace: bool) -> dict[str, Any]:
    """One measurement in a fresh interpreter (clean memory baseline, cold caches)."""
    command = [sys.executable, __file__, "--measure", client, "--base", base_url]
    if trace:
        command.append("--trace")
    done = subprocess.run(command, capture_output=True, timeout=MEASURE_TIMEOUT, check=False)
    lines = done.stdout.decode().strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"measurement {client} failed:\n{done.stderr.decode()[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# --- the comparison ---


@dataclass
class Figures:
    """All measurements of one client in one mode."""

    seconds: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    traced: list[int] = field(default_factory=list)
    sizes: set[int] = field(default_factory=set)
    rss_reset: bool = True


def compare(servers: dict[tuple[str, bool], Server], runs: int, traced_runs: int) -> int:
    """Run every measurement, print the tables; 0 if every goal is met, 1 if not."""
    figures = {(mode, client): Figures() for mode in MODES for client in CLIENTS}
    # Interleaved so a slow patch of the machine hits every client alike.
    for trace, count in ((False, runs), (True, traced_runs)):
        for _ in range(count):
            for mode in MODES:
                for client in CLIENTS:
                    server = servers[(mode, client == "ours-stream")]
                    result = run_child(client, server.base_url, trace)
                    entry = figures[(mode, client)]
                    entry.sizes.add(result["bytes"])
                    entry.rss_reset &= bool(result["rss_reset"])
                    if trace:
                        entry.traced.append(result["traced_peak"])
                    else:
                        entry.seconds.append(result["seconds"])
                        entry.rss.append(result["rss_growth"])

    rows: list[list[object]] = []
    summary: list[str] = []
    missed = False
    for mode in MODES:
        sdk = figures[(mode, "sdk")]
        sdk_time, sdk_traced, sdk_rss = median(sdk.seconds), median(sdk.traced), median(sdk.rss)
        for client in CLIENTS:
            entry = figures[(mode, client)]
            time_s, traced, rss = median(entry.seconds), median(entry.traced), median(entry.rss)
            rows.append(
                [
                    f"{mode:<4} {LABELS[client]}",
                    f"{time_s * 1e3:.0f}",
                    f"{min(entry.seconds) * 1e3:.0f}-{max(entry.seconds) * 1e3:.0f}",
                    f"{traced / MB:.1f}",
                    f"{rss / MB:.1f}",
                    "-" if client == "sdk" else f"{time_s / sdk_time:.2f}",
                    "-" if client == "sdk" else f"{traced / sdk_traced:.2f}",
                    "-" if client == "sdk" else f"{rss / sdk_rss:.2f}",
                ]
            )
        ours = figures[(mode, "ours")]
        time_ratio = median(ours.seconds) / sdk_time
        memory_ratio = max(median(ours.traced) / sdk_traced, median(ours.rss) / sdk_rss)
        time_ok = verdict(time_ratio, GOAL_TIME)
        memory_ok = verdict(memory_ratio, GOAL_MEMORY)
        missed |= "MISSED" in (time_ok, memory_ok)
        summary.append(
            f"{mode}: time ours/SDK {time_ratio:.2f} (goal <= {GOAL_TIME}: {time_ok}); "
            f"memory ours/SDK {memory_ratio:.2f}, the worse of the two readings "
            f"(goal <= {GOAL_MEMORY}: {memory_ok})"
        )
        sizes = {size for client in CLIENTS for size in figures[(mode, client)].sizes}
        if len(sizes) != 1:
            summary.append(f"{mode}: WARNING: clients got different sizes {sorted(sizes)}")
            missed = True

    print(
        table(
            [
                "mode client",
                "ms/image",
                "min-max",
                "tracemalloc MB",
                "RSS peak MB",
                "time /SDK",
                "tracemalloc /SDK",
                "RSS /SDK",
            ],
            rows,
        )
    )
    print()
    for line in summary:
        print(line)
    if not all(f.rss_reset for f in figures.values()):
        print("note: could not reset the RSS peak mark; RSS figures are lifetime-peak growth")
    return 1 if missed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed runs, 1 traced")
    parser.add_argument("--runs", type=int, help="timed runs per client and mode (9; quick 3)")
    parser.add_argument("--traced-runs", type=int, help="tracemalloc runs (3; quick 1)")
    parser.add_argument(
        "--image",
        choices=("noisy", "mock"),
        default="noisy",
        help="noisy: photo-like grain, ~25 MB PNGs (default); mock: a small smooth gradient",
    )
    # Internal: the server and measurement child processes.
    parser.add_argument("--measure", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:
        print(json.dumps(asyncio.run(measure(args.measure, args.base, args.trace))))
        return 0
    try:
        import openai
    except ImportError:
        print(
            "bench/upstream.py compares against the official openai SDK, which is not "
            "installed.\nInstall the bench extra from the repo root:  pip install -e '.[bench]'",
            file=sys.stderr,
        )
        return 2
    runs = args.runs or (3 if args.quick else 9)
    traced_runs = args.traced_runs or (1 if args.quick else 3)

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="drawbridge-bench-") as tmp_name:
        tmp = Path(tmp_name)
        noisy = args.image == "noisy"
        image_note = "photo-like grain" if noisy else "the mock's smooth gradient"
        servers: dict[tuple[str, bool], Server] = {}
        try:
            for mode in MODES:
                for stream in (False, True):
                    name = f"{mode}{'-stream' if stream else ''}"
                    servers[(mode, stream)] = start_server(name, mode, stream, noisy, tmp)
            body = warm_server(servers[("b64", False)])
            for server in servers.values():
                warm_server(server)
            print(f"upstream client vs openai SDK {openai.__version__}, httpx {httpx.__version__}")
            print(f"machine: {machine()}")
            print(
                f"one {SIZE} PNG per call ({image_note}; b64 answer {body / MB:.1f} MB), mock "
                f"upstream in its own process on 127.0.0.1, no added latency; {runs} timed + "
                f"{traced_runs} traced fresh processes per client and mode; medians"
            )
            print()
            code = compare(servers, runs, traced_runs)
        finally:
            for server in servers.values():
                server.process.terminate()
            for server in servers.values():
                try:
                    server.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    server.process.kill()
                    server.process.wait()
    print(f"({time.monotonic() - started:.0f} s in all)")
    return code


if __name__ == "__main__":
    sys.exit(main())
