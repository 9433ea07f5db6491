import re
import uuid

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.contrib.auth import middleware as auth
from django.contrib.messages import middleware as message
from django.contrib.sessions import middleware as sessions
from django.middleware import common

from gateway_project.logging import request_id_var

# An incoming id is reused only when it is short and safe to echo into headers
# and logs. Any other value is replaced by a fresh id.
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _request_id_from(request) -> str:
    incoming = request.headers.get("X-Request-ID", "")
    if _VALID_REQUEST_ID.match(incoming):
        return incoming
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Give each request an id, expose it to logging and echo it in the response.

    Works in sync and async stacks, so async views are not pushed onto a thread.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        request.request_id = _request_id_from(request)
        token = request_id_var.set(request.request_id)
        try:
            response = self.get_response(request)
        finally:
            request_id_var.reset(token)
        response["X-Request-ID"] = request.request_id
        return response

    async def __acall__(self, request):
        request.request_id = _request_id_from(request)
        token = request_id_var.set(request.request_id)
        try:
            response = await self.get_response(request)
        finally:
            request_id_var.reset(token)
        response["X-Request-ID"] = request.request_id
        return response


class InlineHooksMixin:
    """Run a Django middleware's hooks on the event loop instead of a thread.

    On an async request Django runs each sync ``process_request`` and
    ``process_response`` through the one thread-sensitive worker thread: two
    thread hops per middleware per request, about 0.1 ms each, and a queue
    behind any slow sync view. The middlewares below only read and write the
    request and response in memory, so their hooks run inline.

    NOTE: Django's SecurityMiddleware, CsrfViewMiddleware and
    XFrameOptionsMiddleware keep their thread hops, because ``check --deploy``
    recognises them only by their exact dotted paths.
    """

    async def __acall__(self, request):
        response = None
        if hasattr(self, "process_request"):
            response = self.process_request(request)
        response = response or await self.get_response(request)
        if hasattr(self, "process_response"):
            response = self.process_response(request, response)
        return response


class CommonMiddleware(InlineHooksMixin, common.CommonMiddleware):
    pass


class AuthenticationMiddleware(InlineHooksMixin, auth.AuthenticationMiddleware):
    """Attach the lazy ``request.user``, which loads the user only when read."""


class MessageMiddleware(message.MessageMiddleware):
    """Attach message storage inline, and store messages in a thread if any."""

    async def __acall__(self, request):
        self.process_request(request)
        response = await self.get_response(request)
        storage = request._messages
        if storage.used or storage.added_new:
            # Storing may read the session, which loads it from the database.
            return await sync_to_async(self.process_response)(request, response)
        return self.process_response(request, response)


class SessionMiddleware(sessions.SessionMiddleware):
    """Create the lazy session inline, and save it in a thread if it changed."""

    async def __acall__(self, request):
        self.process_request(request)
        response = await self.get_response(request)
        session = request.session
        if session.modified or settings.SESSION_SAVE_EVERY_REQUEST:
            # Saving writes to the session store, the database by default.
            return await sync_to_async(self.process_response)(request, response)
        return self.process_response(request, response)
