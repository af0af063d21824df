"""One error hierarchy for the whole service; `server/status.py` maps it to gRPC and HTTP."""

from __future__ import annotations


class ClipError(Exception):
    """Base of every error the service raises on purpose; its message is for the caller
    (`server/status.caller_message` says where that is not so)."""


class InvalidInput(ClipError):
    """The caller sent something we refuse (INVALID_ARGUMENT)."""

    def __init__(self, message: str, *, field: str | None = None, index: int | None = None):
        where = ""
        if field is not None:
            where = f"{field}[{index}]: " if index is not None else f"{field}: "
        super().__init__(where + message)
        #: The rule that was broken, without the "field[index]: " prefix.
        self.reason = message
        self.field = field
        self.index = index


#: Seconds a refused caller is told to wait when no queue state says better (a full Triton
#: queue, a full HTTP slot table): about one batch on a CPU, many on a GPU.
DEFAULT_RETRY_AFTER_S = 1.0


class Overloaded(ClipError):
    """Too much work queued or a request over a size limit (RESOURCE_EXHAUSTED)."""

    def __init__(self, message: str, *, retry_after_s: float | None = DEFAULT_RETRY_AFTER_S):
        super().__init__(message)
        #: When the same request may fit, told to the caller (HTTP `Retry-After`, gRPC
        #: `grpc-retry-pushback-ms`); None: waiting will not help (it is too large).
        self.retry_after_s = retry_after_s


class RequestTooLarge(Overloaded):
    """A request body over the size limit (RESOURCE_EXHAUSTED, as gRPC's own refusal of
    an oversized message; HTTP 413)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after_s=None)


class AnswerTooLarge(Overloaded):
    """A request whose answer would pass the send limit, refused before any work
    (RESOURCE_EXHAUSTED, as gRPC's own refusal of an oversized message; HTTP 413)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after_s=None)  # the same request will never fit


class RequestTimeout(ClipError):
    """An HTTP request whose headers or body did not arrive within their deadline
    (HTTP 408; the connection is closed)."""


class RouteNotFound(ClipError):
    """An HTTP path the API does not have (HTTP 404)."""


class MethodNotAllowed(ClipError):
    """An HTTP method the path does not take (HTTP 405, with `Allow`)."""

    def __init__(self, message: str, allow: str) -> None:
        super().__init__(message)
        self.allow = allow


class BackendUnavailable(ClipError):
    """The model backend is not reachable or not ready (UNAVAILABLE)."""

    #: A restarting replica or a reconnect is usually back within seconds; callers told
    #: so back off instead of hammering a gateway that cannot serve them yet.
    retry_after_s: float | None = DEFAULT_RETRY_AFTER_S


class ModelMismatch(ClipError):
    """The backend serves another model than the gateway's metadata describes, or one
    whose identity it cannot tell (FAILED_PRECONDITION); nothing is served meanwhile."""


class DeadlineExceeded(ClipError):
    """The caller's deadline passed before the work finished (DEADLINE_EXCEEDED)."""


class BackendFailure(ClipError):
    """The backend answered with an error that is not the caller's fault (INTERNAL).

    The message quotes the backend's own error, which may carry a traceback, file paths
    or code: it is for the log. Callers are told only which part failed (`source`).
    """

    def __init__(self, message: str, *, source: str = "the model backend") -> None:
        super().__init__(message)
        self.source = source


class ModelNotFound(ClipError):
    """The request names a model the gateway does not serve (NOT_FOUND); the message
    names the ones it does."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(
            f"model {name!r} is not served here; known models: {', '.join(known) or 'none'}"
        )
        self.name = name
        self.known = known


class ItemNotFound(ClipError):
    """A catalog call names an item id the catalog does not hold (NOT_FOUND)."""


class Unauthenticated(ClipError):
    """No API key, or one that is not accepted (UNAUTHENTICATED, HTTP 401)."""


class NotConfigured(ClipError):
    """A call to a part this gateway was not started with, such as the catalog without
    `--catalog` (UNIMPLEMENTED, HTTP 501)."""
