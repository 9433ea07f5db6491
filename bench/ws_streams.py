"""Measure many concurrent token streams over the chat websocket.

Run: .venv/bin/python -m bench.ws_streams [--streams 500]

Everything runs on 127.0.0.1 in one run: the fake Gemini server started alone
(``python -m tests.fake_gemini``, each response 20 chunks 50 ms apart), Redis for
the channel layer, one daphne process serving the gateway, and this process
holding every websocket. All sockets connect first; then each sends one chat
with the cache off and reads its stream to the end.

Reported: how many streams got all their chunks, in order and complete; the
time to the first token; and how late each later chunk arrives relative to
the vendor's schedule. The fake sends no timestamps, so chunk i is taken to
leave the vendor ``i * chunk_delay`` after chunk 0, and its lateness is
``arrival_i - arrival_0 - i * chunk_delay``. That figure therefore also counts
the fake's own scheduling lag and this client's, which share the two cores.
"""

import argparse
import asyncio
import json
import resource
import statistics
import time
import uuid
from dataclasses import dataclass, field

from websockets.asyncio.client import connect

from bench.harness import fake_gemini, gateway, machine_summary, redis_server

MODEL = "gemini-3.5-flash"
# Twisted, under daphne, listens with a backlog of 50 by default, so connecting
# hundreds of sockets at once could overflow it and turn handshakes into SYN
# retries. Connection setup is not what the figures measure.
_CONNECTS_AT_ONCE = 50


@dataclass
class StreamResult:
    sent_at: float = 0.0
    arrivals: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    finished: bool = False
    error: str | None = None


def raise_fd_limit(needed: int) -> int:
    """Raise this process's open-file limit (inherited by the servers it starts)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def one_stream(
    url: str,
    index: int,
    connecting: asyncio.Semaphore,
    connected: list[int],
    go: asyncio.Event,
) -> StreamResult:
    result = StreamResult()
    try:
        async with connecting:
            socket = await connect(url, compression=None, open_timeout=60)
        async with socket:
            connected.append(index)
            await go.wait()
            result.sent_at = time.perf_counter()
            chat = {
                "type": "chat",
                "id": f"s{index}",
                "prompt": f"stream {index} {uuid.uuid4().hex}",
                "model": MODEL,
                "cache": False,
            }
            await socket.send(json.dumps(chat))
            async for message in socket:
                frame = json.loads(message)
                if frame["type"] == "token":
                    result.arrivals.append(time.perf_counter())
                    result.texts.append(frame["text"])
                elif frame["type"] == "done":
                    result.finished = True
                    break
                elif frame["type"] == "error":
                    result.error = frame["error"]["code"]
                    break
    except (OSError, TimeoutError, Exception) as error:  # noqa: BLE001 - counted
        result.error = f"{type(error).__name__}: {error}"
    return result


async def run_streams(url: str, count: int) -> tuple[list[StreamResult], float]:
    connecting = asyncio.Semaphore(_CONNECTS_AT_ONCE)
    connected: list[int] = []
    go = asyncio.Event()
    tasks = [
        asyncio.create_task(one_stream(url, index, connecting, connected, go))
        for index in range(count)
    ]
    # Start every stream together once all sockets are open (or failed).
    while len(connected) + sum(task.done() for task in tasks) < count:
        await asyncio.sleep(0.05)
    started = time.perf_counter()
    go.set()
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - started


def summarize(results: list[StreamResult], chunks: int, chunk_delay: float) -> dict:
    expected = [f"token{index} " for index in range(chunks)]
    complete = [r for r in results if r.finished and r.texts == expected]
    first_token_ms = [(r.arrivals[0] - r.sent_at) * 1000 for r in complete]
    lateness_ms = [
        (r.arrivals[i] - r.arrivals[0] - i * chunk_delay) * 1000
        for r in complete
        for i in range(1, len(r.arrivals))
    ]
    errors: dict[str, int] = {}
    for r in results:
        if not r.finished:
            reason = r.error or "closed before done"
            errors[reason] = errors.get(reason, 0) + 1
        elif r.texts != expected:
            errors["tokens lost or reordered"] = (
                errors.get("tokens lost or reordered", 0) + 1
            )
    return {
        "complete": len(complete),
        "errors": errors,
        "first_token_ms": first_token_ms,
        "lateness_ms": lateness_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=500, help="concurrent streams")
    parser.add_argument("--chunks", type=int, default=20, help="chunks per response")
    parser.add_argument(
        "--chunk-delay", type=float, default=0.05, help="seconds between chunks"
    )
    args = parser.parse_args()

    # Each stream uses a client socket, a server socket and an upstream socket.
    fd_limit = raise_fd_limit(args.streams * 4 + 1024)
    fake_options = (
        "--chunks",
        str(args.chunks),
        "--chunk-delay",
        str(args.chunk_delay),
    )
    with redis_server() as redis_url, fake_gemini(*fake_options) as vendor:
        # The bench database has no API keys, and GATEWAY_AUTH=off is accepted
        # only with debug on; no request here runs a database query.
        with gateway(vendor, redis_url, DJANGO_DEBUG="true") as base:
            url = base.replace("http://", "ws://") + "/ws/chat"
            # One stream first, so the figures leave out what the first request
            # of a process pays once (the SDK client and its connection pool).
            asyncio.run(run_streams(url, 1))
            results, wall = asyncio.run(run_streams(url, args.streams))

    summary = summarize(results, args.chunks, args.chunk_delay)
    first = summary["first_token_ms"]
    late = summary["lateness_ms"]
    schedule = (args.chunks - 1) * args.chunk_delay
    print(f"Machine: {machine_summary()}; open-file limit {fd_limit}")
    print(
        f"{args.streams} concurrent websocket streams, {args.chunks} chunks each, "
        f"{args.chunk_delay * 1000:.0f} ms apart (vendor schedule {schedule:.2f} s)\n"
    )
    print(f"Streams complete (all chunks, in order): {summary['complete']}")
    for reason, count in sorted(summary["errors"].items()):
        print(f"  not complete, {reason}: {count}")
    print(f"Wall time from the first send to the last stream's end: {wall:.2f} s\n")
    if not first:
        return
    print("| measure | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|")
    print(
        f"| time to first token | {statistics.median(first):.1f} | "
        f"{percentile(first, 0.99):.1f} | {max(first):.1f} |"
    )
    print(
        f"| chunk lateness vs the vendor's schedule | {statistics.median(late):.1f} "
        f"| {percentile(late, 0.99):.1f} | {max(late):.1f} |"
    )


if __name__ == "__main__":
    main()
