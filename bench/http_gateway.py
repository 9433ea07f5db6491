"""Measure the REST gateway against the framework floor and the fake vendor.

Run: .venv/bin/python -m bench.http_gateway [--requests 2000]

Everything runs on 127.0.0.1 in one run: a fake Gemini server, Redis, and one
daphne process serving the gateway with an extra bare async view (the floor).
Figures are printed as a Markdown table, with ratios computed in this run.
"""

import argparse
import http.client
import json
import multiprocessing
import statistics
import threading
import time
import uuid
from urllib.parse import urlparse

from bench.harness import fake_gemini, gateway, machine_summary, redis_server

MODEL = "gemini-3.5-flash"


class Connection:
    """A keep-alive HTTP/1.1 connection with as little client overhead as possible."""

    def __init__(self, base_url: str):
        url = urlparse(base_url)
        self.conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)

    def request(self, method: str, path: str, body: dict | None = None) -> tuple:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload else {}
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


def expect(status: int, cache: str | None, wanted_status: int, wanted_cache=None):
    if status != wanted_status or (wanted_cache and cache != wanted_cache):
        raise RuntimeError(f"unexpected reply: {status} X-Cache={cache}")


def single_client_latency(base: str, vendor: str, count: int) -> dict:
    gateway_conn = Connection(base)
    vendor_conn = Connection(vendor)
    hit_body = {"prompt": "What is a cache?", "model": MODEL}
    expect(*gateway_conn.request("POST", "/chat", hit_body)[:2], 200)
    vendor_path = f"/v1beta/models/{MODEL}:generateContent"
    vendor_body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}

    def floor(_):
        expect(*gateway_conn.request("GET", "/bench/floor")[:2], 200)

    def hit(_):
        expect(*gateway_conn.request("POST", "/chat", hit_body)[:2], 200, "hit-l1")

    def miss(index):
        body = {"prompt": f"question {index} {uuid.uuid4().hex}", "model": MODEL}
        expect(*gateway_conn.request("POST", "/chat", body)[:2], 200, "miss")

    def direct(_):
        expect(*vendor_conn.request("POST", vendor_path, vendor_body)[:2], 200)

    # Interleave the series in rounds so background noise spreads over all four.
    results = {"floor": [], "hit": [], "miss": [], "direct": []}
    calls = {"floor": floor, "hit": hit, "miss": miss, "direct": direct}
    rounds = 10
    for round_index in range(rounds):
        for name, call in calls.items():
            offset = round_index * (count // rounds)
            results[name] += timed(
                count // rounds, lambda i, call=call, o=offset: call(o + i)
            )
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

    with redis_server() as redis_url:
        with fake_gemini() as vendor, gateway(vendor, redis_url) as base:
            latency = single_client_latency(base, vendor, args.requests)
            rps = hits_per_second(base, args.clients, args.seconds)
        with fake_gemini("--delay", "1.0") as slow_vendor:
            with gateway(slow_vendor, redis_url) as base:
                wall, statuses = concurrent_slow_requests(base, args.concurrent)

    p50 = {name: statistics.median(values) for name, values in latency.items()}
    p99 = {name: percentile(values, 0.99) for name, values in latency.items()}
    print(f"Machine: {machine_summary()}")
    print(f"Requests per series: {args.requests}, one client, keep-alive\n")
    print("| series | p50 ms | p99 ms |")
    print("|---|---|---|")
    labels = {
        "floor": "bare async Django view (floor)",
        "hit": "POST /chat, L1 hit",
        "miss": "POST /chat, miss (L1, L2, fake vendor)",
        "direct": "fake vendor called directly",
    }
    for name, label in labels.items():
        print(f"| {label} | {p50[name]:.3f} | {p99[name]:.3f} |")
    print()
    print(f"L1 hit / floor at p50: {p50['hit'] / p50['floor']:.2f} (target <= 1.5)")
    print(
        f"miss - direct: p50 {p50['miss'] - p50['direct']:.3f} ms (target <= 3), "
        f"p99 {p99['miss'] - p99['direct']:.3f} ms"
    )
    print(f"L1 hits per second, {args.clients} client processes: {rps:.0f}")
    ok = statuses.count(200)
    print(
        f"{args.concurrent} concurrent requests to a vendor taking 1 s each: "
        f"{wall:.2f} s wall time, {ok} answered 200 (target < 1.5 s)"
    )


if __name__ == "__main__":
    main()
