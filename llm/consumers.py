"""The chat websocket: model responses streamed token by token, several at once.

Frames are JSON text; ``llm.ws_protocol`` defines what they contain. Each chat
or prompt request runs in its own asyncio task, so one connection can have up
to ``WS_MAX_IN_FLIGHT`` responses streaming at once, identified by their ``id``.

A client authenticates in its handshake (Authorization header or bearer
subprotocol) or, since browsers cannot set headers, with an auth frame as its
first frame within WS_AUTH_TIMEOUT_SECONDS.
"""

import asyncio
import json
import logging
import uuid
from contextlib import aclosing, suppress

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from django.conf import settings

from gateway_project.errors import ApiError, NotFound
from gateway_project.logging import request_id_var
from llm import ws_protocol
from llm.access import websocket_api_key
from llm.keys import api_key_check_prompt, api_key_recheck_async
from llm.prompt_events import prompt_group_name
from llm.ws_layer import LayerTolerantConsumer
from prompts_registry.selectors import prompt_get

logger = logging.getLogger(__name__)

# Close codes from the private-use range 4000-4999, because daphne 4.2 (through
# autobahn) lets an application close only with 1000 or 3000-4999; RFC 6455's
# 1008 and 1009 would fail the connection with 1011 instead.
CLOSE_UNAUTHENTICATED = 4401  # as HTTP 401
CLOSE_FRAME_TOO_LARGE = 4009  # as RFC 6455's 1009, "message too big"

# How long a closing connection waits for its cancelled requests to close
# their upstream streams before it stops waiting.
_CANCEL_WAIT_SECONDS = 5.0


class ChatConsumer(LayerTolerantConsumer):
    async def dispatch(self, message):
        """Call the handler of ``message`` as Channels does, minus its thread hop.

        Channels 4.3 first closes stale database connections in the one
        thread that runs database_sync_to_async calls, for every frame. Under
        load each frame then waits its turn for that thread. Every database
        call of this consumer runs through database_sync_to_async, which
        closes stale connections itself before and after.
        """
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']!r}")
        await handler(message)

    async def connect(self):
        self.requests: dict[str, asyncio.Task] = {}
        self.cancel_requested: set[str] = set()
        # Subscribed prompt name -> the id the client gave in its subscribe frame.
        self.subscriptions: dict[str, str | None] = {}
        self.api_key = None
        # Set once the server closes the socket: later frames are ignored.
        self.closing = False
        # Set while a client whose handshake carried no key must still send
        # its auth frame; the timer closes the connection when time runs out.
        self.awaiting_auth = False
        self.auth_timer: asyncio.Task | None = None

        token = request_id_var.set(uuid.uuid4().hex)
        try:
            self.api_key = await websocket_api_key(self.scope)
        except ApiError as error:
            # Accepting first lets the client read why it was rejected, because
            # a handshake refused with HTTP 403 gives a browser no reason.
            await self.accept(subprotocol=ws_protocol.accepted_subprotocol(self.scope))
            await self.reject(None, error)
            return
        finally:
            request_id_var.reset(token)
        await self.accept(subprotocol=ws_protocol.accepted_subprotocol(self.scope))
        if self.api_key is None and settings.GATEWAY_AUTH == "required":
            self.awaiting_auth = True
            self.auth_timer = asyncio.create_task(
                self.expire_auth(settings.WS_AUTH_TIMEOUT_SECONDS),
                name="websocket auth timeout",
            )

    async def receive(self, text_data=None, bytes_data=None):
        if self.closing:
            return
        size = ws_protocol.frame_size(text_data, bytes_data)
        if size > settings.WS_MAX_FRAME_BYTES:
            logger.warning(
                "Closing websocket: a %d-byte frame exceeds WS_MAX_FRAME_BYTES=%d",
                size,
                settings.WS_MAX_FRAME_BYTES,
            )
            error = ws_protocol.frame_too_large(size, settings.WS_MAX_FRAME_BYTES)
            self.closing = True
            await self.send_frame(ws_protocol.error_frame(None, error))
            await self.close(code=CLOSE_FRAME_TOO_LARGE)
            return

        # Every frame gets a request id, so the logs of a rejected frame and of
        # the request task started from it (which copies this context) carry it.
        token = request_id_var.set(uuid.uuid4().hex)
        client_id = None
        try:
            if self.awaiting_auth:
                await self.receive_first_frame(text_data, bytes_data)
                return
            frame = ws_protocol.decode_frame(text_data, bytes_data)
            client_id = ws_protocol.client_id_of(frame)
            frame_type = ws_protocol.validate_frame(frame)
            await self.handle_frame(frame_type, client_id, frame)
        except ApiError as error:
            logger.info("Rejected websocket frame: %s", error.code)
            await self.send_frame(ws_protocol.error_frame(client_id, error))
        except Exception as error:  # noqa: BLE001 - error_frame logs it as a 500
            await self.send_frame(ws_protocol.error_frame(client_id, error))
        finally:
            request_id_var.reset(token)

    async def receive_first_frame(self, text_data, bytes_data) -> None:
        """Authenticate by the first frame; reject the client for any other frame.

        The timer keeps running until the key is checked. A server failure
        while checking it leaves the client awaiting auth, so it may retry
        before the timer closes the connection.
        """
        try:
            frame = ws_protocol.decode_auth_frame(text_data, bytes_data)
        except ApiError as error:
            await self.reject(None, error)
            return
        await self.authenticate(ws_protocol.client_id_of(frame), frame)

    async def authenticate(self, client_id, frame: dict) -> None:
        try:
            key = await ws_protocol.auth_frame_api_key(frame)
        except ApiError as error:
            await self.reject(client_id, error)
            return
        if self.closing:
            # The auth timer fired while the key was being checked.
            return
        self.api_key = key
        self.awaiting_auth = False
        self.stop_auth_timer()
        await self.send_frame(ws_protocol.authenticated_frame(client_id, key))

    async def expire_auth(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        # From here on this task must not be cancelled by stop_auth_timer.
        self.auth_timer = None
        token = request_id_var.set(uuid.uuid4().hex)
        try:
            await self.reject(None, ws_protocol.auth_timed_out(seconds))
        finally:
            request_id_var.reset(token)

    def stop_auth_timer(self) -> None:
        if self.auth_timer is not None:
            self.auth_timer.cancel()
            self.auth_timer = None

    async def reject(self, client_id, error: ApiError) -> None:
        """Send the authentication error and close with 4401, unless already closing.

        The auth timer and a frame's key check can both end in a rejection,
        and only the first one reaches the client.
        """
        if self.closing:
            return
        logger.warning("Rejected websocket client: %s", error.code)
        self.closing = True
        await self.send_frame(ws_protocol.error_frame(client_id, error))
        await self.close(code=CLOSE_UNAUTHENTICATED)

    async def handle_frame(self, frame_type: str, client_id, frame: dict) -> None:
        if frame_type in ws_protocol.REQUEST_TYPES:
            self.start_request(frame_type, client_id, frame)
        elif frame_type == "cancel":
            self.cancel_request(client_id)
        elif frame_type == "subscribe":
            await self.subscribe(client_id, ws_protocol.subscription_prompt(frame))
        elif frame_type == "unsubscribe":
            await self.unsubscribe(client_id, ws_protocol.subscription_prompt(frame))
        elif self.api_key is not None:
            raise ws_protocol.already_authenticated(self.api_key)
        else:
            # GATEWAY_AUTH=off: a connection without a key may add one.
            await self.authenticate(client_id, frame)

    def start_request(self, frame_type: str, client_id: str, frame: dict) -> None:
        if client_id in self.requests:
            raise ApiError(
                f"A request with id {client_id!r} is still in flight: use a new id "
                "for each request.",
                code="duplicate_id",
                field="id",
            )
        if len(self.requests) >= settings.WS_MAX_IN_FLIGHT:
            raise ApiError(
                f"This connection already has {settings.WS_MAX_IN_FLIGHT} requests "
                "in flight: wait for one to finish or cancel one.",
                code="too_many_requests",
                status_code=429,
            )
        fields = ws_protocol.request_fields(frame)
        self.requests[client_id] = asyncio.create_task(
            self.serve_request(frame_type, client_id, fields),
            name=f"websocket {frame_type} {client_id}",
        )

    async def serve_request(self, frame_type: str, client_id: str, fields: dict):
        outcome = ws_protocol.RequestOutcome(endpoint=f"ws_{frame_type}")
        frames = ws_protocol.request_frames(frame_type, client_id, fields, self.api_key)
        try:
            async with aclosing(frames):
                async for frame in frames:
                    outcome.observe(frame)
                    await self.send_frame(frame)
        except asyncio.CancelledError:
            # A cancel frame is confirmed once the upstream stream is closed. A
            # closed connection has no client left to confirm it to.
            if client_id in self.cancel_requested and not self.closing:
                # The socket may close while the upstream stream closes; a
                # failed send must not replace the cancellation.
                with suppress(Exception):
                    await self.send_frame(ws_protocol.cancelled_frame(client_id))
            raise
        except Exception as error:  # noqa: BLE001 - error_payload logs unknown ones
            outcome.status, frame = ws_protocol.request_error(client_id, error)
            await self.send_frame(frame)
        finally:
            self.requests.pop(client_id, None)
            self.cancel_requested.discard(client_id)
            outcome.record()

    def cancel_request(self, client_id: str) -> None:
        task = self.requests.get(client_id)
        if task is None:
            raise ApiError(
                f"No request with id {client_id!r} is in flight; it may have "
                "finished already.",
                code="not_found",
                field="id",
                status_code=404,
            )
        logger.info("Cancelling websocket request %r", client_id)
        self.cancel_requested.add(client_id)
        task.cancel()

    async def subscribe(self, client_id, prompt_name: str) -> None:
        key = await api_key_recheck_async(self.api_key)
        api_key_check_prompt(key, prompt_name)
        try:
            await database_sync_to_async(prompt_get)(name=prompt_name)
        except NotFound as error:
            raise NotFound(str(error.detail), field="prompt") from None
        try:
            await self.join_group(prompt_group_name(prompt_name))
        except Exception as error:  # noqa: BLE001 - any channel layer failure
            logger.warning(
                "Could not subscribe to prompt %r: channel layer failed: %s: %s",
                prompt_name,
                type(error).__name__,
                error,
            )
            raise ApiError(
                "Subscriptions are unavailable right now; retry later.",
                code="subscriptions_unavailable",
                status_code=503,
            ) from None
        self.subscriptions[prompt_name] = client_id
        await self.send_frame(
            ws_protocol.subscription_frame("subscribed", client_id, prompt_name)
        )

    async def unsubscribe(self, client_id, prompt_name: str) -> None:
        if self.subscriptions.pop(prompt_name, False) is not False:
            await self.leave_prompt_group(prompt_name)
        await self.send_frame(
            ws_protocol.subscription_frame("unsubscribed", client_id, prompt_name)
        )

    async def prompt_activated(self, event: dict) -> None:
        """Handle a ``prompt.activated`` event from the channel layer."""
        # Two prompts share a group only if their name hashes collide, and
        # checking the name makes even that harmless.
        prompt_name = event["prompt"]
        if prompt_name not in self.subscriptions:
            return
        client_id = self.subscriptions[prompt_name]
        try:
            key = await api_key_recheck_async(self.api_key)
            api_key_check_prompt(key, prompt_name)
        except ApiError as error:
            # A key revoked, or no longer allowed this prompt, since it
            # subscribed hears of no more changes.
            self.subscriptions.pop(prompt_name, None)
            await self.leave_prompt_group(prompt_name)
            _status, frame = ws_protocol.request_error(client_id, error)
            await self.send_frame(frame)
            return
        await self.send_frame(ws_protocol.prompt_activated_frame(client_id, event))

    async def disconnect(self, code):
        self.stop_auth_timer()
        tasks = list(self.requests.values())
        for task in tasks:
            task.cancel()
        if tasks:
            logger.info(
                "Websocket closed with code %s; cancelled %d requests in flight",
                code,
                len(tasks),
            )
            await asyncio.wait(tasks, timeout=_CANCEL_WAIT_SECONDS)
        for prompt_name in self.subscriptions:
            await self.leave_prompt_group(prompt_name)

    async def leave_prompt_group(self, prompt_name: str) -> None:
        # A membership left behind is harmless: events are filtered by
        # self.subscriptions, and channels_redis expires memberships after a day.
        try:
            await self.leave_group(prompt_group_name(prompt_name))
        except Exception as error:  # noqa: BLE001 - any channel layer failure
            logger.warning(
                "Could not leave the group of prompt %r: %s: %s",
                prompt_name,
                type(error).__name__,
                error,
            )

    async def send_frame(self, frame: dict) -> None:
        await self.send(text_data=json.dumps(frame))
