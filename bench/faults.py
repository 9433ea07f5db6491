"""Load the gateway while Redis and the vendor fail, and check every response.

Run: .venv/bin/python -m bench.faults [--seconds 40]

Everything runs on 127.0.0.1: Redis, one daphne process serving the gateway,
and, inside this process, the fake Gemini server and the clients. Several
clients send cached prompts, unique prompts and SSE streams for a fixed time
while this schedule runs:

1. warm-up;
2. Redis is stopped, then started again on the same port (empty, because the
   bench Redis never saves);
3. the fake vendor returns 503 to every call for a while;
4. the fake vendor hangs for longer than GEMINI_TIMEOUT_SECONDS for a while.

The fake echoes each request's prompt after a fixed prefix, so every response
is checked against its own request. A wrong answer is a 200 whose text is not
the one its prompt produces, a 200 carrying an error body, malformed JSON, an
error without the gateway's error shape, or a stream that ends without an
``event: done`` or ``event: error``. The run prints Markdown tables. It exits
with status 1 when a response was wrong, a request got a 500 or no response,
daphne died, or /ready or L2 took longer than 5 s to work after Redis returned.

A request counts in the phase in which it started, so one started just
before a fault may show that fault's error in the phase before.

CACHE_L1_TTL_SECONDS is 1 s for the run, so cached prompts leave L1 within a
second and show X-Cache: hit-l2 whenever Redis serves them. After the restart
Redis is empty, so the first hit-l2 proves a new L2 write and read.
"""

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from bench.harness import gateway_server, machine_summary, restartable_redis
from tests.fake_gemini import FakeGemini, Reply

MODEL = "gemini-3.5-flash"
# Text the fake sends before echoing the prompt, in three stream events.
ANSWER_PREFIX = ["Echo", " of", ": "]
CACHED_PROMPTS = 8
CACHE_STATUSES = {"hit-l1", "hit-l2", "miss"}
# Gateway settings for the run, small so that faults show within seconds.
RUN_SETTINGS = {
    "GEMINI_TIMEOUT_SECONDS": "2",
    "UPSTREAM_RETRY_MAX_SECONDS": "1",
    "BREAKER_FAILURE_THRESHOLD": "5",
    "BREAKER_COOLDOWN_SECONDS": "3",
    "CACHE_L1_TTL_SECONDS": "1",
    "CACHE_L2_RETRY_SECONDS": "2",
    "REDIS_TIMEOUT_SECONDS": "0.25",
    "GATEWAY_AUTH": "required",
    # Production settings (DEBUG off), but plain HTTP: daphne serves loopback
    # here, where a deployment would have a TLS proxy in front.
    "DJANGO_DEBUG": "false",
    "SECURE_SSL_REDIRECT": "false",
}
# Seconds the hanging vendor waits beyond GEMINI_TIMEOUT_SECONDS.
HANG_EXTRA_SECONDS = 3.0
# Seconds between two polls of /ready and /health.
MONITOR_INTERVAL_SECONDS = 0.1
# Target for /ready and L2 to work again after Redis is back.
REDIS_RECOVERY_TARGET_SECONDS = 5.0
# The run's API key is counted against limits it never reaches, so every
# request goes through the Redis-backed rate limiter.
KEY_LIMITS = ("--rpm", "1000000", "--tpm", "1000000000")


def normal_reply() -> Reply:
    return Reply(chunks=list(ANSWER_PREFIX), echo=True, chunk_delay=0.02)


def expected_text(prompt: str) -> str:
    return "".join(ANSWER_PREFIX) + prompt


@dataclass
class Result:
    """One request and what came back."""

    kind: str  # "cached", "unique" or "stream"
    prompt: str
    started: float
    ended: float = 0.0
    # None when no HTTP response arrived (client timeout, connection error).
    status: int | None = None
    cache: str | None = None
    # Streams with a 200: "done", "error" or None when neither event came.
    stream_end: str | None = None
    # Code of a JSON error response or of an SSE error event.
    error_code: str | None = None
    request_id: str | None = None
    # Why the response does not match its request (a wrong answer).
    problem: str | None = None
    # Client timeout or connection error, when no response arrived.
    failure: str | None = None
    # Start of a JSON body or end of a stream, shown for failed requests.
    excerpt: str = ""


@dataclass
class Phase:
    name: str
    start: float
    end: float


@dataclass
class Timeline:
    """Planned phases and the measured moments of the faults (run seconds)."""

    phases: list[Phase]
    # When the stop was issued, and when redis-server had exited: /ready may
    # fail in between, while L2 may still answer.
    redis_stop_requested: float | None = None
    redis_stopped: float | None = None
    redis_restarted: float | None = None
    burst_ended: float | None = None
    hang_ended: float | None = None
    # (run seconds, /ready status) at each change of the status.
    ready_changes: list[tuple[float, int | None]] = field(default_factory=list)
    health_failures: int = 0


def plan_phases(seconds: float, redis_down: float, burst: float, hang: float):
    """Split the run into warm-up, three faults and a quiet gap after each.

    The gap after the hang is longer by GEMINI_TIMEOUT_SECONDS, because calls
    that began during the hang fail only that long after it ends.
    """
    timeout = float(RUN_SETTINGS["GEMINI_TIMEOUT_SECONDS"])
    gap = (seconds - redis_down - burst - hang - timeout) / 4
    if gap < 3:
        raise SystemExit(
            f"--seconds {seconds:g} leaves {gap:.1f} s between the faults; "
            f"give at least {12 + timeout:g} s more than the faults' total."
        )
    names = [
        ("warm-up", gap),
        ("Redis stopped", redis_down),
        ("after Redis restart", gap),
        ("vendor 503s", burst),
        ("after 503s", gap),
        ("vendor hangs", hang),
        ("after hang", gap + timeout),
    ]
    phases, start = [], 0.0
    for name, length in names:
        phases.append(Phase(name, start, start + length))
        start += length
    return phases


# -- checking responses ------------------------------------------------------


def error_shape_problem(body: object) -> str | None:
    """Return why ``body`` is not the gateway's error shape, or None."""
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return "error response without an error object"
    error = body["error"]
    if not isinstance(error.get("code"), str) or not isinstance(
        error.get("message"), str
    ):
        return "error object without a code and a message"
    if not isinstance(body.get("request_id"), str):
        return "error response without a request_id"
    return None


def check_json_reply(result: Result, body_bytes: bytes) -> None:
    result.excerpt = body_bytes[:300].decode("utf-8", "replace")
    try:
        body = json.loads(body_bytes)
    except ValueError:
        result.problem = "malformed JSON"
        return
    if result.status != 200:
        result.problem = error_shape_problem(body)
        if result.problem is None:
            result.error_code = body["error"]["code"]
            result.request_id = body["request_id"]
        return
    if not isinstance(body, dict):
        result.problem = "200 body is not a JSON object"
    elif "error" in body:
        result.problem = "200 with an error body"
    else:
        result.problem = answer_problem(result, body, body.get("response"))


def answer_problem(result: Result, metadata: dict, text: object) -> str | None:
    """Check a whole answer: a /chat body, or a stream's text and done event."""
    result.request_id = metadata.get("request_id")
    if text != expected_text(result.prompt):
        return "text does not match the request"
    if metadata.get("model") != MODEL:
        return f"model {metadata.get('model')!r} instead of {MODEL}"
    if result.cache not in CACHE_STATUSES:
        return f"X-Cache {result.cache!r}"
    if metadata.get("cached") != result.cache.startswith("hit"):
        return "cached flag disagrees with X-Cache"
    return None


def parse_events(raw: str) -> list[tuple[str, str]]:
    """Split an SSE body into (event name, data) pairs; "message" when unnamed."""
    events = []
    for block in raw.split("\n\n"):
        if not block.strip():
            continue
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[len("event:") :].strip()
            elif line.startswith("data:"):
                data.append(line[len("data:") :].strip())
        events.append((name, "\n".join(data)))
    return events


def check_stream(result: Result, raw: bytes, content_type: str) -> None:
    result.excerpt = raw[-300:].decode("utf-8", "replace")
    if not content_type.startswith("text/event-stream"):
        result.problem = f"stream with Content-Type {content_type!r}"
        return
    if not raw:
        result.problem = "empty stream"
        return
    if not raw.endswith(b"\n\n"):
        result.problem = "stream ends inside an event"
        return
    text: list[str] = []
    for index, (name, data) in enumerate(parse_events(raw.decode("utf-8"))):
        if result.stream_end is not None:
            result.problem = f"event {index} after the {result.stream_end} event"
            return
        try:
            payload = json.loads(data)
        except ValueError:
            result.problem = f"event {index} is not JSON"
            return
        result.problem = event_problem(result, name, payload, text)
        if result.problem:
            return
    if result.stream_end is None:
        result.problem = "stream without a done or error event"


def event_problem(result: Result, name: str, payload: object, text: list[str]):
    """Check one SSE event, given the text streamed before it; add its text."""
    if name == "message":
        if not isinstance(payload, dict) or not isinstance(payload.get("text"), str):
            return "text event without a text string"
        text.append(payload["text"])
        return None
    if name == "done":
        result.stream_end = "done"
        if not isinstance(payload, dict):
            return "done event is not a JSON object"
        return answer_problem(result, payload, "".join(text))
    if name == "error":
        result.stream_end = "error"
        if not expected_text(result.prompt).startswith("".join(text)):
            return "text before the error does not match the request"
        problem = error_shape_problem(payload)
        if problem is None:
            result.error_code = payload["error"]["code"]
        return problem
    return f"unknown event {name!r}"


# -- clients -------------------------------------------------------------------


async def send(client: httpx.AsyncClient, result: Result, clock) -> None:
    path = "/chat/stream" if result.kind == "stream" else "/chat"
    body = {"prompt": result.prompt, "model": MODEL}
    try:
        async with client.stream("POST", path, json=body) as response:
            result.status = response.status_code
            result.cache = response.headers.get("X-Cache")
            raw = await response.aread()
        content_type = response.headers.get("Content-Type", "")
        if result.kind == "stream" and result.status == 200:
            check_stream(result, raw, content_type)
        else:
            check_json_reply(result, raw)
    except httpx.TimeoutException as error:
        result.failure = f"client timeout ({type(error).__name__})"
    except httpx.HTTPError as error:
        # A stream cut off by a dying server lands here too.
        result.failure = f"{type(error).__name__}: {error}"
        if result.status == 200 and result.kind == "stream":
            result.problem = "stream broke off"
    finally:
        result.ended = clock()


async def client_loop(
    role: str, number: int, base_url: str, key: str, args, clock, results: list
) -> None:
    """Send ``role`` requests one after another until --seconds have passed."""
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=args.timeout
    ) as client:
        index = 0
        while clock() < args.seconds:
            index += 1
            result = Result(role, next_prompt(role, number, index), clock())
            await send(client, result, clock)
            results.append(result)
            await asyncio.sleep(args.pause)


def next_prompt(role: str, number: int, index: int) -> str:
    # Streams alternate between cached prompts and unique ones.
    cached = role == "cached" or (role == "stream" and index % 2 == 0)
    if cached:
        return f"Repeated question {(number + index) % CACHED_PROMPTS}"
    return f"Unique question {number}-{index} {uuid.uuid4().hex}"


# -- faults and monitoring -----------------------------------------------------


async def run_faults(timeline: Timeline, redis, fake: FakeGemini, clock) -> None:
    phases = {phase.name: phase for phase in timeline.phases}
    timeout = float(RUN_SETTINGS["GEMINI_TIMEOUT_SECONDS"])
    hang = Reply(delay=timeout + HANG_EXTRA_SECONDS)

    def restart_redis() -> float:
        redis.start()
        # Taken in this thread: the event loop may run other tasks before
        # to_thread returns, and /ready may already pass by then.
        return clock()

    await sleep_until(phases["Redis stopped"].start, clock)
    timeline.redis_stop_requested = clock()
    await asyncio.to_thread(redis.stop)
    timeline.redis_stopped = clock()
    await sleep_until(phases["Redis stopped"].end, clock)
    timeline.redis_restarted = await asyncio.to_thread(restart_redis)

    await sleep_until(phases["vendor 503s"].start, clock)
    fake.default_reply = Reply(status=503)
    await sleep_until(phases["vendor 503s"].end, clock)
    fake.default_reply = normal_reply()
    timeline.burst_ended = clock()

    await sleep_until(phases["vendor hangs"].start, clock)
    fake.default_reply = hang
    await sleep_until(phases["vendor hangs"].end, clock)
    fake.default_reply = normal_reply()
    timeline.hang_ended = clock()


async def sleep_until(moment: float, clock) -> None:
    await asyncio.sleep(max(0.0, moment - clock()))


async def monitor(base_url: str, timeline: Timeline, deadline: float, clock):
    """Poll /ready and /health, recording each change of /ready's status."""
    last = object()
    async with httpx.AsyncClient(base_url=base_url, timeout=2.0) as client:
        while clock() < deadline:
            ready = await status_of(client, "/ready")
            if ready != last:
                timeline.ready_changes.append((clock(), ready))
                last = ready
            if await status_of(client, "/health") != 200:
                timeline.health_failures += 1
            await asyncio.sleep(MONITOR_INTERVAL_SECONDS)


async def status_of(client: httpx.AsyncClient, path: str) -> int | None:
    try:
        return (await client.get(path)).status_code
    except httpx.HTTPError:
        return None


# -- report ----------------------------------------------------------------------


def phase_of(result: Result, phases: list[Phase]) -> str:
    for phase in phases:
        if result.started < phase.end:
            return phase.name
    return phases[-1].name


def summarize(results: list[Result]) -> dict:
    answered = [r for r in results if r.status == 200 and r.problem is None]
    caches = Counter(r.cache for r in answered)
    # JSON error responses; error events inside 200 streams are counted apart.
    errors = Counter(
        f"{r.status} {r.error_code}"
        for r in results
        if r.status != 200 and r.error_code is not None
    )
    streams = [r for r in results if r.kind == "stream" and r.status == 200]
    return {
        "requests": len(results),
        "l1": caches["hit-l1"],
        "l2": caches["hit-l2"],
        "miss": caches["miss"],
        "errors": errors,
        "done": sum(1 for r in streams if r.stream_end == "done"),
        "stream_errors": Counter(
            r.error_code for r in streams if r.stream_end == "error"
        ),
        "wrong": sum(1 for r in results if r.problem is not None),
        "status_500": sum(1 for r in results if r.status == 500),
        "no_response": sum(1 for r in results if r.failure is not None),
    }


def counts_text(counter: Counter) -> str:
    if not counter:
        return "0"
    return ", ".join(f"{name} ×{count}" for name, count in sorted(counter.items()))


def phase_row(name: str, window: str, summary: dict) -> str:
    streams = f"{summary['done']} / {counts_text(summary['stream_errors'])}"
    cells = [
        name,
        window,
        summary["requests"],
        f"{summary['l1']} / {summary['l2']} / {summary['miss']}",
        counts_text(summary["errors"]),
        streams,
        summary["wrong"],
        summary["status_500"],
        summary["no_response"],
    ]
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def first_after(results: list[Result], moment: float | None, matches) -> float | None:
    """Return seconds from ``moment`` to the end of the first matching response."""
    if moment is None:
        return None
    ends = [r.ended for r in results if r.ended >= moment and matches(r)]
    return min(ends) - moment if ends else None


def first_started_after(results, moment, matches) -> float | None:
    if moment is None:
        return None
    ends = [r.ended for r in results if r.started >= moment and matches(r)]
    return min(ends) - moment if ends else None


def ready_after(timeline: Timeline) -> float | None:
    """Return seconds from the Redis restart until /ready first passed again."""
    if timeline.redis_stopped is None or timeline.redis_restarted is None:
        return None
    for changed_at, status in timeline.ready_changes:
        if changed_at >= timeline.redis_stopped and status == 200:
            # A poll racing the restart can pass a moment before it is noted.
            return max(0.0, changed_at - timeline.redis_restarted)
    return None


def during_outage(moment: float, timeline: Timeline) -> bool:
    stopped, restarted = timeline.redis_stopped, timeline.redis_restarted
    return (
        stopped is not None and restarted is not None and stopped <= moment < restarted
    )


def seconds_text(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


def is_fresh_miss(result: Result) -> bool:
    if result.problem is not None or result.status != 200 or result.cache != "miss":
        return False
    return result.kind != "stream" or result.stream_end == "done"


def print_report(
    args, results: list[Result], timeline: Timeline, alive: bool, log_path: Path
):
    print(f"Machine: {machine_summary()}")
    settings_text = ", ".join(f"{name}={value}" for name, value in RUN_SETTINGS.items())
    print(
        f"Run: {args.seconds:g} s, {args.clients} clients (cached prompts, unique "
        f"prompts, SSE streams), one daphne process, one API key "
        f"({' '.join(KEY_LIMITS)}); {settings_text}"
    )
    print(f"daphne log: {log_path}\n")

    print(
        "| phase | run s | requests | 200 hit-l1 / hit-l2 / miss | errors "
        "(status code ×n) | SSE done / error events | wrong | 500 | no response |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    by_phase: dict[str, list[Result]] = {p.name: [] for p in timeline.phases}
    for result in results:
        by_phase[phase_of(result, timeline.phases)].append(result)
    for phase in timeline.phases:
        window = f"{phase.start:.1f}–{phase.end:.1f}"
        print(phase_row(phase.name, window, summarize(by_phase[phase.name])))
    total = summarize(results)
    print(phase_row("**all**", f"0–{args.seconds:g}", total))

    redis_ready = ready_after(timeline)
    redis_l2 = first_started_after(
        results, timeline.redis_restarted, lambda r: r.cache == "hit-l2"
    )
    burst_back = first_after(results, timeline.burst_ended, is_fresh_miss)
    hang_back = first_after(results, timeline.hang_ended, is_fresh_miss)
    l2_during_outage = sum(
        1 for r in results if r.cache == "hit-l2" and during_outage(r.started, timeline)
    )
    ready_failed = any(
        status != 200
        and timeline.redis_stop_requested is not None
        and timeline.redis_restarted is not None
        and timeline.redis_stop_requested <= changed_at < timeline.redis_restarted
        for changed_at, status in timeline.ready_changes
    )
    healthy = alive and timeline.health_failures == 0
    cooldown = RUN_SETTINGS["BREAKER_COOLDOWN_SECONDS"]
    target = REDIS_RECOVERY_TARGET_SECONDS
    print()
    print("| check | result | target |")
    print("|---|---|---|")
    print(f"| wrong answers | {total['wrong']} | 0 |")
    print(f"| 500 responses | {total['status_500']} | 0 |")
    print(f"| requests without a response | {total['no_response']} | 0 |")
    print(
        f"| daphne alive, /health 200 all run | {'yes' if healthy else 'no'} "
        f"({timeline.health_failures} failed polls) | yes |"
    )
    print(f"| hit-l2 while Redis was stopped | {l2_during_outage} | 0 |")
    print(
        f"| /ready failed while Redis was stopped | {'yes' if ready_failed else 'no'} "
        "| yes |"
    )
    print(
        f"| Redis restart → /ready 200 | {seconds_text(redis_ready)} | ≤ {target:g} s |"
    )
    print(
        f"| Redis restart → first hit-l2 (written after the restart) | "
        f"{seconds_text(redis_l2)} | ≤ {target:g} s |"
    )
    print(
        f"| end of 503s → first 200 miss | {seconds_text(burst_back)} | "
        f"≤ cool-down {cooldown} s + one call |"
    )
    print(
        f"| end of hang → first 200 miss | {seconds_text(hang_back)} | "
        f"≤ timeout {RUN_SETTINGS['GEMINI_TIMEOUT_SECONDS']} s + cool-down "
        f"{cooldown} s + one call |"
    )

    print_problems(results)
    return [
        total["wrong"] == 0,
        total["status_500"] == 0,
        total["no_response"] == 0,
        healthy,
        ready_failed,
        redis_ready is not None and redis_ready <= REDIS_RECOVERY_TARGET_SECONDS,
        redis_l2 is not None and redis_l2 <= REDIS_RECOVERY_TARGET_SECONDS,
    ]


def print_problems(results: list[Result], limit: int = 10) -> None:
    bad = [r for r in results if r.problem or r.failure or r.status == 500]
    if not bad:
        return
    print(f"\nFirst {min(limit, len(bad))} of {len(bad)} failed requests:")
    for result in bad[:limit]:
        print(
            f"- t={result.started:.2f}–{result.ended:.2f} {result.kind} "
            f"{result.prompt!r}: status {result.status}, X-Cache {result.cache}, "
            f"request_id {result.request_id}: {result.problem or result.failure}; "
            f"body: {result.excerpt!r}"
        )


# -- main ----------------------------------------------------------------------


async def load(args, base_url: str, key: str, redis, fake: FakeGemini):
    started = time.monotonic()

    def clock() -> float:
        return time.monotonic() - started

    timeline = Timeline(
        plan_phases(args.seconds, args.redis_down, args.burst, args.hang)
    )
    results: list[Result] = []
    roles = ("cached", "unique", "stream")
    clients = [
        client_loop(roles[number % 3], number, base_url, key, args, clock, results)
        for number in range(args.clients)
    ]
    await asyncio.gather(
        run_faults(timeline, redis, fake, clock),
        monitor(base_url, timeline, args.seconds, clock),
        *clients,
    )
    results.sort(key=lambda result: result.started)
    return results, timeline


def final_health(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=40.0, help="run length")
    parser.add_argument("--clients", type=int, default=6, help="concurrent clients")
    parser.add_argument(
        "--pause", type=float, default=0.05, help="seconds between a client's requests"
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="client timeout per request, s"
    )
    parser.add_argument("--redis-down", type=float, default=8.0, help="seconds")
    parser.add_argument("--burst", type=float, default=5.0, help="503s, seconds")
    parser.add_argument("--hang", type=float, default=5.0, help="hang, seconds")
    parser.add_argument(
        "--dump", type=Path, help="write every request's result to this JSON file"
    )
    args = parser.parse_args()

    log_file = tempfile.NamedTemporaryFile(
        prefix="faults-daphne-", suffix=".log", delete=False
    )
    log_path = Path(log_file.name)
    log_file.close()
    fake = FakeGemini(default_reply=normal_reply())
    fake.start()
    try:
        with restartable_redis() as redis:
            with gateway_server(
                fake.base_url, redis.url, log_path=log_path, **RUN_SETTINGS
            ) as server:
                key = server.manage("create_api_key", "faults bench", *KEY_LIMITS)
                key = key.strip()
                results, timeline = asyncio.run(
                    load(args, server.url, key, redis, fake)
                )
                alive = server.process.poll() is None and final_health(server.url)
    finally:
        fake.stop()

    if args.dump:
        records = {
            "timeline": asdict(timeline),
            "results": [asdict(result) for result in results],
        }
        args.dump.write_text(json.dumps(records, indent=1))
    checks = print_report(args, results, timeline, alive, log_path)
    raise SystemExit(0 if all(checks) else 1)


if __name__ == "__main__":
    main()
