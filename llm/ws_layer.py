"""A websocket consumer that outlives an outage of its channel layer.

Channels' AsyncConsumer reads the client and the channel layer together, and
an exception from the layer (Redis going away, say) ends the consumer and so
closes the client's socket, with every response it was streaming. Here the layer
is only needed for group events, so its failures are logged and retried while
the socket keeps working.
"""

import asyncio
import logging

from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from channels.utils import await_many_dispatch

logger = logging.getLogger(__name__)

# Pauses between attempts to reach a failed channel layer, in seconds.
_RETRY_FIRST_SECONDS = 0.5
_RETRY_MAX_SECONDS = 5.0


class LayerTolerantConsumer(AsyncWebsocketConsumer):
    """AsyncWebsocketConsumer whose channel-layer failures never close the socket.

    Subclasses join groups with ``join_group`` and leave them with
    ``leave_group``, so the groups can be joined again once the layer is back:
    a restarted Redis has forgotten every membership.
    """

    async def __call__(self, scope, receive, send):
        # Channels 4.3's AsyncConsumer.__call__, with the layer's receive
        # replaced by receive_layer_event.
        self.scope = scope
        self.joined_groups: set[str] = set()
        self.layer_failing = False
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        self.base_send = send
        sources = [receive]
        if self.channel_layer is not None:
            self.channel_name = await self.channel_layer.new_channel()
            sources.append(self.receive_layer_event)
        try:
            await await_many_dispatch(sources, self.dispatch)
        except StopConsumer:
            pass

    async def receive_layer_event(self) -> dict:
        """Return the next event for this channel, waiting out layer failures."""
        failures = 0
        while True:
            try:
                if failures:
                    await self._rejoin_groups()
                # NOTE: under load (300 sockets closing at once, or Redis
                # restarting) daphne was seen killing a consumer cancelled
                # while waiting here, after its shutdown timeout. The cause in
                # channels-redis is not known; the socket is closed either way.
                event = await self.channel_layer.receive(self.channel_name)
            except Exception as error:  # noqa: BLE001 - any layer failure is retried
                failures += 1
                if not self.layer_failing:
                    self.layer_failing = True
                    logger.warning(
                        "Channel layer failed (%s: %s); group events are paused "
                        "and retried until it is reachable again",
                        type(error).__name__,
                        error,
                    )
                delay = min(_RETRY_MAX_SECONDS, _RETRY_FIRST_SECONDS * 2**failures)
                await asyncio.sleep(delay)
                continue
            self._mark_layer_reachable()
            return event

    async def _rejoin_groups(self) -> None:
        # A successful group_add is also the proof that the layer is back,
        # which receive alone gives only when an event arrives.
        for group in self.joined_groups:
            await self.channel_layer.group_add(group, self.channel_name)
        if self.joined_groups:
            self._mark_layer_reachable()

    def _mark_layer_reachable(self) -> None:
        if self.layer_failing:
            self.layer_failing = False
            logger.info(
                "Channel layer reachable again; rejoined %d groups",
                len(self.joined_groups),
            )

    async def join_group(self, group: str) -> None:
        await self.channel_layer.group_add(group, self.channel_name)
        self.joined_groups.add(group)

    async def leave_group(self, group: str) -> None:
        self.joined_groups.discard(group)
        await self.channel_layer.group_discard(group, self.channel_name)
