"""Measure the REST gateway against the framework floor and the fake vendor.

Run: .venv/bin/python -m bench.http_gateway [--requests 2000]

Everything runs on 127.0.0.1 in one run: a fake Gemini server, Redis, and one
daphne process serving the gateway with an extra bare async view (the floor).
Figures are printed as a Markdown table, with ratios computed in this run.

The gateway runs with DJANGO_DEBUG=true and GATEWAY_AUTH=off, the one
configuration in which settings accept requests without a key, so the main
series measure the framework and the chat path without a key lookup. One more
series sends a real gateway key. DJANGO_DEBUG=true also leaves out the
HTTPS-only settings, which would redirect plain HTTP. A bare view costs about
the same with DJANGO_DEBUG=false and SECURE_SSL_REDIRECT=false instead.
"""

import argparse
import asyncio
import http.client
import json
import multiprocessing
import os
import statistics
import threading
import time
import uuid
from urllib.parse import urlparse

from google import genai
from google.genai import types

from bench.harness import (
    fake_gemini,
    gateway,
    gateway_server,
    machine_summary,
    redis_server,
)

MODEL = "gemini-3.5-flash"
# GATEWAY_AUTH=off is accepted only with DJANGO_DEBUG=true.
GATEWAY_ENV = {"DJANGO_DEBUG": "true", "GATEWAY_AUTH": "off"}
# Limits the run never reaches, so a keyed request still goes through the
# Redis-backed rate limiter.
KEY_OPTIONS = ("--rpm", "1000000")


class Connection:
    """A keep-alive HTTP/1.1 connection with as little client overhead as possible."""

    def __init__(self, base_url: str):
        url = urlparse(base_url)
        self.conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)

    def request(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple:
        payload = json.dumps(body).encode() if body is not None else None
        headers = dict(headers or {})
        if payload:
            headers["Content-Type"] = "application/json"
        self.conn.request(method, path, body=payload, headers=headers)
        response = self.conn.getresponse()
        data = response.read()
        return response.status, response.getheader("X-Cache"), data


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def timed(count: int, call) -> list[float]:
    samples = []
    for index in range(count):
        started = time.perf_counter()
        call(index)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def expect(status: int, cache: str | None, expected_status: int, expected_cache=None):
    if status != expected_status or (expected_cache and cache != expected_cache):
        raise RuntimeError(f"unexpected reply: {status} X-Cache={cache}")


class SdkCaller:
    """A google-genai client that calls the fake vendor with the gateway's options.

    The client lives on one event loop, so its connection is kept alive
    between calls, as the gateway's is.
    """

    def __init__(self, vendor: str):
        options = types.HttpOptions(
            base_url=vendor, retry_options=types.HttpRetryOptions(attempts=1)
        )
        self.client = genai.Client(
            api_key="bench-key", vertexai=False, http_options=options
        )
        self.config = types.GenerateContentConfig(
            automatic_function_calling=types.AutomaticFunctionCallingConfig(
                disable=True
            ),
            automatic_continuation=False,
        )
        self.loop = asyncio.new_event_loop()

    def call(self) -> None:
        self.loop.run_until_complete(
            self.client.aio.models.generate_content(
                model=MODEL, contents="hi", config=self.config
            )
        )

    def close(self) -> None:
        self.loop.run_until_complete(self.client.aio.aclose())
        self.loop.close()


def single_client_latency(base: str, vendor: str, count: int, key: str) -> dict:
    gateway_conn = Connection(base)
    vendor_conn = Connection(vendor)
    sdk = SdkCaller(vendor)
    hit_body = {"prompt": "What is a cache?", "model": MODEL}
    key_headers = {"Authorization": f"Bearer {key}"}
    expect(*gateway_conn.request("POST", "/chat", hit_body)[:2], 200)
    vendor_path = f"/v1beta/models/{MODEL}:generateContent"
    vendor_body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}

    def floor(_):
        expect(*gateway_conn.request("GET", "/bench/floor")[:2], 200)

    def hit(_):
        expect(*gateway_conn.request("POST", "/chat", hit_body)[:2], 200, "hit-l1")

    def hit_with_key(_):
        reply = gateway_conn.request("POST", "/chat", hit_body, key_headers)
        expect(*reply[:2], 200, "hit-l1")

    def miss(index):
        body = {"prompt": f"question {index} {uuid.uuid4().hex}", "model": MODEL}
        expect(*gateway_conn.request("POST", "/chat", body)[:2], 200, "miss")

    def direct(_):
        expect(*vendor_conn.request("POST", vendor_path, vendor_body)[:2], 200)

    def direct_sdk(_):
        sdk.call()

    # Interleave the series in rounds so background noise spreads over all.
    calls = {
        "floor": floor,
        "hit": hit,
        "miss": miss,
        "direct": direct,
        "hit_key": hit_with_key,
        "sdk": direct_sdk,
    }
    results = {name: [] for name in calls}
    rounds = 10
    try:
        for round_index in range(rounds):
            for name, call in calls.items():
                offset = round_index * (count // rounds)
                results[name] += timed(
                    count // rounds, lambda i, call=call, o=offset: call(o + i)
                )
    finally:
        sdk.close()
    return results


def _hit_worker(base: str, seconds: float, queue) -> None:
    conn = Connection(base)
    body = {"prompt": "What is a cache?", "model": MODEL}
    done = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        status, cache, _ = conn.request("POST", "/chat", body)
        expect(status, cache, 200, "hit-l1")
        done += 1
    queue.put(done)


def hits_per_second(base: str, clients: int, seconds: float) -> float:
    queue = multiprocessing.Queue()
    workers = [
        multiprocessing.Process(target=_hit_worker, args=(base, seconds, queue))
        for _ in range(clients)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(queue.get() for _ in workers) / seconds


def warm_up(base: str) -> None:
    """Send one request, so the gateway imports google-genai and builds its client.

    The gateway does both on the first request that calls Gemini. The cold
    line of the output shows a burst that pays for them.
    """
    body = {"prompt": f"warm-up {uuid.uuid4().hex}", "model": MODEL}
    expect(*Connection(base).request("POST", "/chat", body)[:2], 200, "miss")


def concurrent_slow_requests(base: str, count: int) -> tuple[float, list[int]]:
    statuses = []
    lock = threading.Lock()
    barrier = threading.Barrier(count + 1)

    def one(index):
        conn = Connection(base)
        barrier.wait()
        body = {"prompt": f"slow {index} {uuid.uuid4().hex}", "model": MODEL}
        status, _, _ = conn.request("POST", "/chat", body)
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="per series")
    parser.add_argument("--clients", type=int, default=4, help="for requests/s")
    parser.add_argument("--seconds", type=float, default=5.0, help="for requests/s")
    parser.add_argument("--concurrent", type=int, default=50)
    args = parser.parse_args()
    # Other work on the machine moves every figure, so the output states it.
    load_before = os.getloadavg()[0]

    with redis_server() as redis_url:
        with (
            fake_gemini() as vendor,
            gateway_server(vendor, redis_url, **GATEWAY_ENV) as server,
        ):
            key = server.manage("create_api_key", "http bench", *KEY_OPTIONS)
            latency = single_client_latency(
                server.url, vendor, args.requests, key.strip()
            )
            rps = hits_per_second(server.url, args.clients, args.seconds)
        with fake_gemini("--delay", "1.0") as slow_vendor:
            with gateway(slow_vendor, redis_url, **GATEWAY_ENV) as base:
                cold_wall, cold_statuses = concurrent_slow_requests(
                    base, args.concurrent
                )
            with gateway(slow_vendor, redis_url, **GATEWAY_ENV) as base:
                warm_up(base)
                wall, statuses = concurrent_slow_requests(base, args.concurrent)

    p50 = {name: statistics.median(values) for name, values in latency.items()}
    p99 = {name: percentile(values, 0.99) for name, values in latency.items()}
    print(f"Machine: {machine_summary()}")
    print(
        f"1-minute load average before the run: {load_before:.2f}, "
        f"after it: {os.getloadavg()[0]:.2f}"
    )
    print(
        "Gateway: one daphne process, DJANGO_DEBUG=true, GATEWAY_AUTH=off "
        "(the main series send no key), Redis as L2"
    )
    print(f"Requests per series: {args.requests}, one client, keep-alive\n")
    print("| series | p50 ms | p99 ms |")
    print("|---|---|---|")
    labels = {
        "floor": "bare async Django view (floor)",
        "hit": "POST /chat, L1 hit",
        "miss": "POST /chat, miss (L1, L2, fake vendor)",
        "direct": "fake vendor called directly",
        "hit_key": "POST /chat, L1 hit with a gateway key (informational)",
        "sdk": "fake vendor called through google-genai (informational)",
    }
    for name, label in labels.items():
        print(f"| {label} | {p50[name]:.3f} | {p99[name]:.3f} |")
    print()
    print(f"L1 hit / floor at p50: {p50['hit'] / p50['floor']:.2f} (target <= 1.5)")
    print(
        f"miss - direct: p50 {p50['miss'] - p50['direct']:.3f} ms (target <= 3), "
        f"p99 {p99['miss'] - p99['direct']:.3f} ms"
    )
    print(
        f"  of which the google-genai call: p50 {p50['sdk'] - p50['direct']:.3f} ms "
        "(same fake, same keep-alive, from the bench process)"
    )
    print(f"L1 hits per second, {args.clients} client processes: {rps:.0f}")
    print(
        f"{args.concurrent} concurrent requests to a vendor taking 1 s each, "
        f"after one warm-up request: {wall:.2f} s wall time, "
        f"{statuses.count(200)} answered 200 (target < 1.5 s)"
    )
    print(
        f"  the same as the first requests of a fresh process: {cold_wall:.2f} s, "
        f"{cold_statuses.count(200)} answered 200 (informational)"
    )


if __name__ == "__main__":
    main()
