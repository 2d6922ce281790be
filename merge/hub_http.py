"""A time limit on every Hub request that huggingface_hub sends without one.

huggingface_hub's shared ``httpx2`` client has no default timeout, and its API calls (create repo, preupload,
commit, LFS batch/upload) pass none, so a server that accepts the connection and never answers blocks a push
forever; its retry helper would also repeat a timed-out call up to five times. Suture wraps the client's
transports: a request that carries no timeout of its own waits at most ``seconds`` for each connect, send and
read, and when that runs out it raises :class:`HubTimeout`, which the retry helper does not catch, so the
push ends after one silent wait. Requests that carry their own timeout (downloads) are left unchanged.
Transfers made by ``hf_xet`` do not go through this client and keep their own limits.
"""

from __future__ import annotations

import logging
import threading

import httpx2

logger = logging.getLogger(__name__)

DEFAULT_SECONDS = 60.0
_state = {"seconds": DEFAULT_SECONDS}
_install_lock = threading.Lock()


class HubTimeout(Exception):
    """No answer from the server within the limit (deliberately not an httpx error: it must not be retried)."""

    def __init__(self, url: str, seconds: float) -> None:
        super().__init__(f"no answer from {url} within {seconds:g} s")
        self.url = url
        self.seconds = seconds


class _BoundedStream(httpx2.SyncByteStream):
    """A response body whose read timeouts become :class:`HubTimeout` too."""

    def __init__(self, inner: httpx2.SyncByteStream, url: str, seconds: float) -> None:
        self.inner, self.url, self.seconds = inner, url, seconds

    def __iter__(self):
        try:
            yield from self.inner
        except httpx2.TimeoutException as exc:
            raise HubTimeout(self.url, self.seconds) from exc

    def close(self) -> None:
        self.inner.close()


class _BoundedTransport(httpx2.BaseTransport):
    """Gives time-limit-less requests the current limit and turns their timeouts into :class:`HubTimeout`."""

    def __init__(self, inner: httpx2.BaseTransport) -> None:
        self.inner = inner

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        timeout = request.extensions.get("timeout") or {}
        if any(value is not None for value in timeout.values()):
            return self.inner.handle_request(request)
        seconds = _state["seconds"]
        request.extensions["timeout"] = dict.fromkeys(("connect", "read", "write", "pool"), seconds)
        url = f"{request.url.scheme}://{request.url.netloc.decode('ascii', 'replace')}{request.url.path}"
        try:
            response = self.inner.handle_request(request)
        except httpx2.TimeoutException as exc:
            raise HubTimeout(url, seconds) from exc
        # the body is read after this returns: a server that stalls after its headers must end the same way
        response.stream = _BoundedStream(response.stream, url, seconds)
        return response

    def close(self) -> None:
        self.inner.close()


def _bounded_client() -> httpx2.Client:
    from huggingface_hub.utils._http import default_client_factory

    client = default_client_factory()
    transport, mounts = getattr(client, "_transport", None), getattr(client, "_mounts", None)
    if isinstance(transport, httpx2.BaseTransport) and isinstance(mounts, dict):
        client._transport = _BoundedTransport(transport)
        client._mounts = {k: (_BoundedTransport(t) if t is not None else None) for k, t in mounts.items()}
    else:  # another httpx2 layout: at least no request waits forever (the library may retry it)
        client.timeout = httpx2.Timeout(_state["seconds"])
    return client


def bound_hub_requests(seconds: float) -> None:
    """Limit every timeout-less huggingface_hub request to `seconds` per network wait, from now on.

    Installs the bounded client factory once, unless the application set its own factory (then only a
    debug line: the application's client decides).
    """
    from huggingface_hub.utils import _http

    _state["seconds"] = float(seconds)
    with _install_lock:
        current = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None)
        if current is _bounded_client:
            return
        if current is not getattr(_http, "default_client_factory", None):
            logger.debug("a custom huggingface_hub client factory is set; Hub request time limits are left to it")
            return
        _http.set_client_factory(_bounded_client)


__all__ = ["DEFAULT_SECONDS", "HubTimeout", "bound_hub_requests"]
