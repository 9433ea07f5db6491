"""Typed errors of the LLM service.

Provider adapters translate every vendor failure into one of these, so views,
consumers and the cache never see a vendor's own exception types. ``retryable``
tells whether trying the same request again can help.
"""

from rest_framework import status

from gateway_project.errors import ApiError


class LLMError(ApiError):
    """Base class for failures of a model call."""

    status_code = status.HTTP_502_BAD_GATEWAY
    default_code = "upstream_error"
    default_detail = "The model provider failed."
    retryable = False


class UpstreamRateLimited(LLMError):
    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    default_code = "upstream_rate_limited"
    default_detail = "The model provider is rate limiting the gateway; retry later."
    retryable = True


class UpstreamUnavailable(LLMError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_code = "upstream_unavailable"
    default_detail = "The model provider is unavailable; retry later."
    retryable = True


class UpstreamTimeout(LLMError):
    status_code = status.HTTP_504_GATEWAY_TIMEOUT
    default_code = "upstream_timeout"
    default_detail = "The model provider did not answer in time."
    retryable = True


class UpstreamAuthFailed(LLMError):
    default_code = "upstream_auth_failed"
    default_detail = (
        "The model provider refused the gateway's API key; an operator must fix "
        "GEMINI_API_KEY."
    )


class UpstreamBadResponse(LLMError):
    default_code = "upstream_error"


class ContentBlocked(LLMError):
    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    default_code = "content_blocked"
    default_detail = "The model provider blocked the prompt or the answer."


class ModelBusy(LLMError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_code = "model_busy"
    default_detail = "The local model's queue is full; retry later."
    retryable = True
