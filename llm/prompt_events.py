"""Tell websocket subscribers, in every worker process, that a prompt changed.

Each prompt has a channel-layer group, which a consumer joins when its client
subscribes. The ``prompt_activated`` signal receiver below sends one event to
the group each time the prompt's active version changes.
"""

import asyncio
import hashlib
import logging
import re

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

logger = logging.getLogger(__name__)

# Channels 4.3 (channels/layers.py) accepts group names of ASCII letters,
# digits, hyphens, underscores and periods, shorter than 100 characters.
_GROUP_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_GROUP_PREFIX = "prompt."
_MAX_GROUP_CHARS = 99

# An unreachable Redis must not hold an admin save for long.
GROUP_SEND_TIMEOUT_SECONDS = 2.0

EVENT_TYPE = "prompt.activated"


def prompt_group_name(prompt_name: str) -> str:
    """Return the channel-layer group of a prompt's subscribers.

    A name that is not already a valid group name is replaced by its safe
    characters plus 64 bits of a SHA-256 of the original, so two names share a
    group only if those hashes collide.
    """
    candidate = _GROUP_PREFIX + prompt_name
    if not _GROUP_UNSAFE.search(candidate) and len(candidate) <= _MAX_GROUP_CHARS:
        return candidate
    digest = hashlib.sha256(prompt_name.encode("utf-8")).hexdigest()[:16]
    safe = _GROUP_UNSAFE.sub("_", prompt_name)[:60]
    return f"{_GROUP_PREFIX}{safe}.{digest}"


def prompt_activated_event(
    prompt_name: str, version: int, previous_version: int | None
) -> dict:
    return {
        "type": EVENT_TYPE,
        "prompt": prompt_name,
        "version": version,
        "previous_version": previous_version,
    }


async def _group_send(group: str, event: dict) -> None:
    channel_layer = get_channel_layer()
    if channel_layer is None:
        return
    await asyncio.wait_for(
        channel_layer.group_send(group, event), GROUP_SEND_TIMEOUT_SECONDS
    )


def broadcast_prompt_activated(
    sender,
    *,
    prompt_name: str,
    version: int,
    previous_version: int | None = None,
    **kwargs,
) -> None:
    """Receiver of ``prompts_registry.signals.prompt_activated``.

    The activation is already committed when the signal is sent, so a channel
    layer failure is logged and swallowed: subscribers miss one event, but the
    admin save that caused it still succeeds.
    """
    event = prompt_activated_event(prompt_name, version, previous_version)
    group = prompt_group_name(prompt_name)
    try:
        async_to_sync(_group_send)(group, event)
    except Exception as error:  # noqa: BLE001 - any layer failure, see docstring
        logger.warning(
            "Could not notify websocket subscribers that prompt %r is now at "
            "version %s: %s: %s",
            prompt_name,
            version,
            type(error).__name__,
            error,
        )
        return
    logger.info(
        "Notified websocket subscribers that prompt %r is now at version %s",
        prompt_name,
        version,
    )
