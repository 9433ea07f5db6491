"""Origin check for websocket handshakes, with every rejection logged."""

import logging
from urllib.parse import ParseResult

from channels.security.websocket import OriginValidator
from django.conf import settings

logger = logging.getLogger(__name__)


class LoggingOriginValidator(OriginValidator):
    """Reject browsers on other sites, log why, and admit clients with no Origin.

    Browsers send an Origin header on every websocket handshake (RFC 6455), so
    checking it stops other sites from opening sockets with a user's cookies. A
    client without the header is not a browser and could send any Origin it
    liked, so rejecting it would protect nothing. Channels 4.3 itself rejects a
    missing Origin unless ``"*"`` is allowed, and this class admits it.
    """

    def valid_origin(self, parsed_origin: ParseResult | None) -> bool:
        if parsed_origin is None:
            return True
        if parsed_origin.hostname is None:
            logger.warning(
                "Rejected websocket handshake: Origin %r has no host name",
                parsed_origin.geturl(),
            )
            return False
        if self.validate_origin(parsed_origin):
            return True
        logger.warning(
            "Rejected websocket handshake: Origin %r is not in ALLOWED_HOSTS (%s)",
            parsed_origin.geturl(),
            ", ".join(self.allowed_origins),
        )
        return False


def allowed_hosts_origin_validator(application) -> LoggingOriginValidator:
    """Wrap a websocket application so only origins in ALLOWED_HOSTS may connect."""
    allowed_hosts = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed_hosts:
        # The same fallback as Channels' own AllowedHostsOriginValidator.
        allowed_hosts = ["localhost", "127.0.0.1", "[::1]"]
    return LoggingOriginValidator(application, allowed_hosts)
