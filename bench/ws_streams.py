"""Measure many concurrent token streams over the chat websocket.

Run: .venv/bin/python -m bench.ws_streams [--streams 500]

Everything runs on 127.0.0.1 in one run: the fake Gemini server started alone
(``python -m tests.fake_gemini --stamp``, each response 20 chunks 50 ms apart),
Redis for the channel layer, one daphne process serving the gateway, and this
process holding every websocket. All sockets connect first. Then each sends
one chat with the cache off and reads its stream to the end.

Reported:

- how many streams got all their chunks, in order, followed by a done frame;
- the time to the first token, from sending the chat frame to its first token
  frame, and the part of it until the vendor sent that chunk;
- the latency each chunk gains on its way through the gateway: the fake stamps
  each chunk with ``time.time()`` right before writing it, and this client
  subtracts the stamp from ``time.time()`` when the token frame arrives. Both
  run on one machine, so the clocks agree. The figure also counts the time the
  chunk waits in this client's event loop and in the kernel, because the
  client, the fake and the gateway share the cores;
- the CPU time daphne and this client used during the streams.
"""

import argparse
import asyncio
import json
import os
import resource
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from websockets.asyncio.client import connect

from bench.harness import fake_gemini, gateway_server, machine_summary, redis_server
from tests.fake_gemini import split_stamp

MODEL = "gemini-3.5-flash"
# Twisted, under daphne, listens with a backlog of 50 by default, so connecting
# hundreds of sockets at once could overflow it and turn handshakes into SYN
# retries. Connection setup is not what the figures measure.
_CONNECTS_AT_ONCE = 50


@dataclass
class StreamResult:
    # time.time() values, comparable with the fake's stamps.
    sent_at: float = 0.0
    arrivals: list[float] = field(default_factory=list)
    stamps: list[float | None] = field(default_factory=list)
    # Token texts without their stamps.
    texts: list[str] = field(default_factory=list)
    finished: bool = False
    error: str | None = None


def raise_fd_limit(needed: int) -> int:
    """Raise this process's open-file limit (inherited by the servers it starts)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
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
            result.sent_at = time.time()
            chat = {
                "type": "chat",
                "id": f"s{index}",
                "prompt": f"stream {index} {uuid.uuid4().hex}",
                "model": MODEL,
                "cache": False,
            }
            await socket.send(json.dumps(chat))
            async for message in socket:
                arrived = time.time()
                frame = json.loads(message)
                if frame["type"] == "token":
                    stamp, text = split_stamp(frame["text"])
                    result.arrivals.append(arrived)
                    result.stamps.append(stamp)
                    result.texts.append(text)
                elif frame["type"] == "done":
                    result.finished = True
                    break
                elif frame["type"] == "error":
                    result.error = frame["error"]["code"]
                    break
    except (OSError, TimeoutError, Exception) as error:  # noqa: BLE001 - counted
        result.error = f"{type(error).__name__}: {error}"
    return result


@dataclass
class Run:
    results: list[StreamResult]
    # From the first chat frame sent to the last stream's end, in seconds.
    wall: float
    # CPU seconds used in that span.
    gateway_cpu: float
    client_cpu: float


async def run_streams(url: str, count: int, gateway_pid: int) -> Run:
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
    gateway_cpu = cpu_seconds(gateway_pid)
    client_cpu = own_cpu_seconds()
    started = time.perf_counter()
    go.set()
    results = await asyncio.gather(*tasks)
    return Run(
        results=results,
        wall=time.perf_counter() - started,
        gateway_cpu=cpu_seconds(gateway_pid) - gateway_cpu,
        client_cpu=own_cpu_seconds() - client_cpu,
    )


def cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU time a process has used so far."""
    # Fields 14 and 15 of /proc/PID/stat, counted from 1, in clock ticks. The
    # command name in field 2 may contain spaces, so fields count from its ")".
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def summarize(results: list[StreamResult], chunks: int) -> dict:
    expected = [f"token{index} " for index in range(chunks)]
    complete = [
        r
        for r in results
        if r.finished and r.texts == expected and None not in r.stamps
    ]
    first_token_ms = [(r.arrivals[0] - r.sent_at) * 1000 for r in complete]
    vendor_first_ms = [(r.stamps[0] - r.sent_at) * 1000 for r in complete]
    # Per chunk position: the first and last chunks of all streams arrive in
    # the same bursts as the streams' setup and teardown work.
    added_ms_at = [
        [(r.arrivals[index] - r.stamps[index]) * 1000 for r in complete]
        for index in range(chunks)
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
        elif None in r.stamps:
            errors["chunks without a send-time stamp"] = (
                errors.get("chunks without a send-time stamp", 0) + 1
            )
    return {
        "complete": len(complete),
        "errors": errors,
        "first_token_ms": first_token_ms,
        "vendor_first_ms": vendor_first_ms,
        "added_ms": [sample for samples in added_ms_at for sample in samples],
        "added_ms_first": added_ms_at[0],
        "added_ms_middle": [
            sample for samples in added_ms_at[1:-1] for sample in samples
        ],
        "added_ms_last": added_ms_at[-1],
    }


def table_row(label: str, samples: list[float]) -> str:
    return (
        f"| {label} | {statistics.median(samples):.1f} | "
        f"{percentile(samples, 0.99):.1f} | {max(samples):.1f} |"
    )


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
        "--stamp",
    )
    load_before = os.getloadavg()[0]
    with redis_server() as redis_url, fake_gemini(*fake_options) as vendor:
        # The bench database has no API keys, and GATEWAY_AUTH=off is accepted
        # only with debug on; no request here runs a database query.
        with gateway_server(vendor, redis_url, DJANGO_DEBUG="true") as server:
            url = server.url.replace("http://", "ws://") + "/ws/chat"
            # One stream first, so the figures leave out what the first request
            # of a process pays once (the SDK client and its connection pool).
            asyncio.run(run_streams(url, 1, server.process.pid))
            run = asyncio.run(run_streams(url, args.streams, server.process.pid))

    summary = summarize(run.results, args.chunks)
    schedule = (args.chunks - 1) * args.chunk_delay
    print(f"Machine: {machine_summary()}; open-file limit {fd_limit}")
    print(
        f"1-minute load average before the run: {load_before:.2f}, "
        f"after it: {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{args.streams} concurrent websocket streams, {args.chunks} chunks each, "
        f"{args.chunk_delay * 1000:.0f} ms apart (vendor schedule {schedule:.2f} s)\n"
    )
    print(f"Streams complete (all chunks, in order): {summary['complete']}")
    for reason, count in sorted(summary["errors"].items()):
        print(f"  not complete, {reason}: {count}")
    print(f"Wall time from the first send to the last stream's end: {run.wall:.2f} s")
    print(
        f"CPU time in that span: daphne {run.gateway_cpu:.2f} s "
        f"({run.gateway_cpu / run.wall:.0%} of one core), this client "
        f"{run.client_cpu:.2f} s ({run.client_cpu / run.wall:.0%})\n"
    )
    if not summary["complete"]:
        return
    print("| measure | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|")
    print(table_row("time to first token", summary["first_token_ms"]))
    print(table_row("of which until the vendor sent it", summary["vendor_first_ms"]))
    print(
        table_row(
            "chunk latency added, vendor send to client receive", summary["added_ms"]
        )
    )
    print(table_row("of the first chunks", summary["added_ms_first"]))
    if summary["added_ms_middle"]:
        print(table_row("of the chunks between", summary["added_ms_middle"]))
    print(table_row("of the last chunks", summary["added_ms_last"]))


if __name__ == "__main__":
    main()
