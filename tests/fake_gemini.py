"""A fake Gemini REST server for tests and benchmarks.

It speaks the part of the Gemini API wire format that the google-genai SDK uses
for ``generateContent`` and ``streamGenerateContent?alt=sse``, so the real SDK
runs unchanged against it. Tests script the reply to each request with
``Reply`` objects. The server records every request it receives and counts the
clients that close a connection before the response is complete.

Run it alone for benchmarks::

    python -m tests.fake_gemini --port 8765 --chunks 20 --chunk-delay 0.05 --stamp
"""

import argparse
import json
import re
import select
import signal
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

# Google's canonical status names, sent in the "status" field of error bodies.
ERROR_STATUSES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
ERROR_MESSAGES = {
    400: "Request contains an invalid argument.",
    401: "API key not valid. Please pass a valid API key.",
    403: "The caller does not have permission.",
    404: "Requested entity was not found.",
    429: "Resource has been exhausted (e.g. check quota).",
    500: "An internal error has occurred.",
    503: "The model is overloaded. Please try again later.",
    504: "The request timed out.",
}
# How often a waiting handler checks whether the server is stopping.
_POLL_SECONDS = 0.05
# The send-time stamp that ``Reply(stamp=True)`` puts before a chunk's text.
_STAMP = re.compile(r"<t=(\d+\.\d+)>")


@dataclass
class Reply:
    """The scripted response to one request."""

    # Text pieces. A stream sends one SSE event per piece, in this order.
    chunks: list[str] = field(default_factory=lambda: ["Hello", " from", " the fake"])
    finish_reason: str = "STOP"
    # A status other than 200 sends an error body in Google's shape instead.
    status: int = 200
    # Retry-After header (seconds) on error replies.
    retry_after: int | None = None
    # promptFeedback.blockReason. A reply with one has no candidates.
    block_reason: str | None = None
    # Seconds before the response starts.
    delay: float = 0.0
    # Seconds between two stream events.
    chunk_delay: float = 0.0
    # Close the socket after reading the request, without any response.
    drop_connection: bool = False
    prompt_tokens: int = 5
    # Error message. The default is Google's usual message for the status.
    message: str | None = None
    # Streams only: close the socket after this many events, without the end.
    drop_after_chunks: int | None = None
    # error.details of an error reply, such as an ErrorInfo with its "reason".
    error_details: list[dict] | None = None
    # Append the text of the request's last user turn as one more chunk, so a
    # client can check that a response belongs to its own request.
    echo: bool = False
    # Streams only: start the text of each chunk with "<t=SECONDS>", the
    # time.time() just before the event is written, so a client on the same
    # machine can measure how long the chunk took to reach it. split_stamp
    # parses it. Events without text carry no stamp.
    stamp: bool = False

    @property
    def text(self) -> str:
        return "".join(self.chunks)


@dataclass
class Call:
    """One request the server received."""

    path: str
    model: str
    body: dict
    stream: bool
    headers: dict[str, str] = field(default_factory=dict)


def error_body(
    status: int, message: str | None = None, details: list[dict] | None = None
) -> dict:
    error = {
        "code": status,
        "message": message or ERROR_MESSAGES.get(status, "Request failed."),
        "status": ERROR_STATUSES.get(status, "UNKNOWN"),
    }
    if details:
        error["details"] = details
    return {"error": error}


def _usage(reply: Reply, candidates_tokens: int) -> dict:
    # NOTE: the fake counts one token per chunk, so its counts differ from real ones.
    return {
        "promptTokenCount": reply.prompt_tokens,
        "candidatesTokenCount": candidates_tokens,
        "totalTokenCount": reply.prompt_tokens + candidates_tokens,
    }


def _candidate(text: str, finish_reason: str | None) -> dict:
    candidate: dict = {"index": 0}
    if text:
        candidate["content"] = {"role": "model", "parts": [{"text": text}]}
    elif finish_reason in (None, "STOP", "MAX_TOKENS"):
        # Gemini sends an empty content when, for example, the token limit was
        # reached before any text. A blocked response has no content at all.
        candidate["content"] = {"role": "model"}
    if finish_reason:
        candidate["finishReason"] = finish_reason
    if finish_reason == "SAFETY":
        candidate["safetyRatings"] = [
            {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH"}
        ]
    return candidate


def response_body(reply: Reply, model: str) -> dict:
    """Build the JSON body of a whole generateContent response."""
    if reply.block_reason:
        return _blocked_body(reply, model)
    return {
        "candidates": [_candidate(reply.text, reply.finish_reason)],
        "usageMetadata": _usage(reply, len(reply.chunks)),
        "modelVersion": model,
        "responseId": uuid.uuid4().hex,
    }


def stream_events(reply: Reply, model: str) -> list[dict]:
    """Build the SSE events of a streamed response, usage and finish on the last."""
    if reply.block_reason:
        return [_blocked_body(reply, model)]
    response_id = uuid.uuid4().hex
    pieces = reply.chunks or [""]
    events = []
    for index, piece in enumerate(pieces):
        last = index == len(pieces) - 1
        event = {
            "candidates": [_candidate(piece, reply.finish_reason if last else None)],
            "modelVersion": model,
            "responseId": response_id,
        }
        if last:
            event["usageMetadata"] = _usage(reply, len(reply.chunks))
        events.append(event)
    return events


def stamp_event(event: dict, seconds: float) -> None:
    """Put the send-time stamp ``<t=SECONDS>`` before each text part of an event."""
    for candidate in event.get("candidates", []):
        for part in candidate.get("content", {}).get("parts", []):
            part["text"] = f"<t={seconds:.6f}>{part['text']}"


def split_stamp(text: str) -> tuple[float | None, str]:
    """Return the send time stamped at the start of ``text`` and the text after it.

    The time is None when ``text`` does not start with a stamp.
    """
    match = _STAMP.match(text)
    if match is None:
        return None, text
    return float(match.group(1)), text[match.end() :]


def _blocked_body(reply: Reply, model: str) -> dict:
    return {
        "promptFeedback": {"blockReason": reply.block_reason},
        "usageMetadata": {
            "promptTokenCount": reply.prompt_tokens,
            "totalTokenCount": reply.prompt_tokens,
        },
        "modelVersion": model,
    }


class FakeGemini:
    """A Gemini API stand-in on 127.0.0.1, served from a background thread.

    Replies queued with ``enqueue`` go to requests in order. Once the queue is
    empty, every request gets ``default_reply``.
    """

    def __init__(self, port: int = 0, default_reply: Reply | None = None):
        self.port = port
        self.default_reply = default_reply or Reply()
        self.calls: list[Call] = []
        # Requests whose client closed the connection before the response ended.
        self.disconnects = 0
        self._replies: deque[Reply] = deque()
        self._condition = threading.Condition()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def call_count(self) -> int:
        with self._condition:
            return len(self.calls)

    def start(self) -> None:
        self._server = _Server(("127.0.0.1", self.port), _Handler, self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": _POLL_SECONDS},
            name=f"fake-gemini-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.stopping.set()
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> "FakeGemini":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def enqueue(self, *replies: Reply) -> None:
        with self._condition:
            self._replies.extend(replies)

    def wait_for_disconnect(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Wait until ``count`` clients in total have disconnected early."""
        with self._condition:
            return self._condition.wait_for(
                lambda: self.disconnects >= count, timeout=timeout
            )

    def wait_for_calls(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Wait until ``count`` requests in total have arrived."""
        with self._condition:
            return self._condition.wait_for(
                lambda: len(self.calls) >= count, timeout=timeout
            )

    def _record(self, call: Call) -> Reply:
        with self._condition:
            self.calls.append(call)
            reply = self._replies.popleft() if self._replies else self.default_reply
            self._condition.notify_all()
            return reply

    def _record_disconnect(self) -> None:
        with self._condition:
            self.disconnects += 1
            self._condition.notify_all()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Benchmarks open hundreds of connections at once, and the default backlog is 5.
    request_queue_size = 1024

    def __init__(self, address, handler, fake: FakeGemini):
        self.fake = fake
        self.stopping = threading.Event()
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, handler)

    def close_connections(self) -> None:
        # Idle keep-alive connections would otherwise keep their threads
        # blocked in a read after the server stopped.
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The status line and headers go out in one write and the body in a second.
    # With Nagle's algorithm on, the second write waits for the client's
    # delayed ACK of the first (about 40 ms on Linux): a stall of this server's
    # own making, which inflated every measured vendor call.
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format, *args) -> None:
        # One line per request would flood test and benchmark output.
        pass

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        route = _route(url.path)
        body = self._read_json()
        if route is None:
            self._send_json(404, error_body(404, f"No route for POST {url.path}."))
            return
        if body is None:
            self._send_json(400, error_body(400, "The request body is not JSON."))
            return

        model, method = route
        stream = method == "streamGenerateContent"
        if stream and parse_qs(url.query).get("alt") != ["sse"]:
            self._send_json(400, error_body(400, "The fake streams only alt=sse."))
            return
        call = Call(url.path, model, body, stream, dict(self.headers.items()))
        reply = self.server.fake._record(call)
        if reply.echo:
            reply = replace(reply, chunks=[*reply.chunks, last_user_text(body)])
        self._reply(reply, model, stream)

    def _reply(self, reply: Reply, model: str, stream: bool) -> None:
        if reply.delay and not self._wait(reply.delay):
            return
        if reply.drop_connection:
            self._drop()
        elif reply.status != 200:
            self._send_json(
                reply.status,
                error_body(reply.status, reply.message, reply.error_details),
                retry_after=reply.retry_after,
            )
        elif stream:
            self._send_stream(reply, model)
        else:
            self._send_json(200, response_body(reply, model))

    def _send_stream(self, reply: Reply, model: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for index, event in enumerate(stream_events(reply, model)):
                if index == reply.drop_after_chunks:
                    self._drop()
                    return
                if index and reply.chunk_delay and not self._wait(reply.chunk_delay):
                    return
                if reply.stamp:
                    stamp_event(event, time.time())
                self._write_chunk(f"data: {json.dumps(event)}\r\n\r\n".encode())
            self._write_chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            self.server.fake._record_disconnect()

    def _write_chunk(self, data: bytes) -> None:
        # HTTP/1.1 chunked framing; an empty chunk ends the body.
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")

    def _send_json(self, status: int, body: dict, retry_after: int | None = None):
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(payload)))
        if retry_after is not None:
            self.send_header("Retry-After", str(retry_after))
        self.end_headers()
        try:
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            self.server.fake._record_disconnect()

    def _read_json(self) -> dict | None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw)
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _wait(self, seconds: float) -> bool:
        """Sleep, but return False as soon as the client hangs up.

        A client that closes its end makes the socket readable with no data,
        so a wait notices the disconnect without writing to the socket.
        """
        deadline = time.monotonic() + seconds
        poller = select.poll()
        poller.register(self.connection, select.POLLIN)
        while (remaining := deadline - time.monotonic()) > 0:
            if self.server.stopping.is_set():
                self.close_connection = True
                return False
            step = min(remaining, _POLL_SECONDS)
            if not poller.poll(step * 1000):
                continue
            if self._client_closed():
                self.close_connection = True
                self.server.fake._record_disconnect()
                return False
            # Unexpected bytes from the client (nothing the SDK sends): wait on.
            time.sleep(step)
        return True

    def _client_closed(self) -> bool:
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


def last_user_text(body: dict) -> str:
    """Return the joined text parts of the last user turn in a request body."""
    contents = body.get("contents")
    if not isinstance(contents, list):
        return ""
    for content in reversed(contents):
        if isinstance(content, dict) and content.get("role", "user") == "user":
            parts = content.get("parts")
            if not isinstance(parts, list):
                return ""
            return "".join(
                part["text"]
                for part in parts
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            )
    return ""


def _route(path: str) -> tuple[str, str] | None:
    """Return ``(model, method)`` for ``/{v1,v1beta}/models/<model>:<method>``."""
    version, _, rest = path.lstrip("/").partition("/")
    if version not in ("v1", "v1beta") or not rest.startswith("models/"):
        return None
    model, _, method = rest.removeprefix("models/").partition(":")
    if not model or "/" in model:
        return None
    if method not in ("generateContent", "streamGenerateContent"):
        return None
    return model, method


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Serve a fake Gemini API on 127.0.0.1 until interrupted."
    )
    parser.add_argument(
        "--port", type=int, default=0, help="TCP port, or 0 for a free one"
    )
    parser.add_argument(
        "--chunks", type=int, default=20, help="text chunks per response"
    )
    parser.add_argument(
        "--chunk-delay", type=float, default=0.0, help="seconds between chunks"
    )
    parser.add_argument(
        "--delay", type=float, default=0.0, help="seconds before each response"
    )
    parser.add_argument(
        "--stamp",
        action="store_true",
        help='start each streamed chunk with its send time, as "<t=SECONDS>"',
    )
    args = parser.parse_args(argv)

    reply = Reply(
        chunks=[f"token{index} " for index in range(args.chunks)],
        delay=args.delay,
        chunk_delay=args.chunk_delay,
        stamp=args.stamp,
    )
    fake = FakeGemini(port=args.port, default_reply=reply)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    fake.start()
    print(f"Fake Gemini listening on {fake.base_url}", flush=True)
    try:
        stopped.wait()
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()
        print(
            f"Fake Gemini stopped; requests received: {fake.call_count}, "
            f"closed early by the client: {fake.disconnects}",
            flush=True,
        )


if __name__ == "__main__":
    main()
