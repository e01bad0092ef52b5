"""Calls from the ingress to another deployment, retried when the replica called is gone.

A replica can die between Serve routing a call to it and answering (a node lost, an OOM kill,
a scale-down). Serve's router then drops that replica from its set but fails the call; the
calls made here (encode, search, info) are idempotent, so they are sent again, to another
replica, a few times with a short backoff. When every try finds the replica gone, or no replica
answers within the caller's deadline (Serve holds a call while a deployment has no running
replica, e.g. after its node died, until the controller has started another one), the client
gets a 503 with ``Retry-After``: never a 500, never an answer without that part.
"""

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from deploy.queries import RequestError

log = logging.getLogger("ray.serve")

#: Seconds to wait before each retry; their number is the number of retries.
BACKOFF_S = (0.05, 0.2, 0.5, 1.0, 2.0)


def _gone_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import RayActorError  # ActorDiedError, ActorUnavailableError

    errors: list[type[BaseException]] = [RayActorError]
    try:
        import grpc

        errors.append(grpc.aio.AioRpcError)  # by-value gRPC transport: replica went away
    except ImportError:  # pragma: no cover - grpc ships with ray[serve]
        pass
    return tuple(errors)


def is_gone(e: BaseException) -> bool:
    """Whether ``e`` says the replica called is gone (worth retrying elsewhere)."""
    if isinstance(e, _gone_errors()):
        code = getattr(e, "code", None)
        if callable(code):  # gRPC: only "could not reach it" codes
            return getattr(code(), "name", "") in ("UNAVAILABLE", "CANCELLED", "UNKNOWN")
        return True
    cause = getattr(e, "cause", None) or e.__cause__
    return cause is not None and cause is not e and is_gone(cause)


async def retry_unavailable(
    call: Callable[..., Any], *args: Any, timeout_s: float | None = None
) -> Any:
    """``await call(*args)``, again after each of :data:`BACKOFF_S` while the replica that got
    it turns out to be gone.

    Args:
        call: the remote method (``handle.method.remote``).
        timeout_s: deadline of all tries together; ``None`` = wait as long as it takes.

    Raises:
        RequestError: 503 when the last try also found the replica gone, or at the deadline.
    """
    try:
        return await asyncio.wait_for(_tries(call, *args), timeout_s)
    except TimeoutError:
        log.warning("ingress: no replica answered within %.1f s", timeout_s)
        raise _unavailable() from None


def _unavailable() -> RequestError:
    return RequestError(
        503, "a part of the service is restarting; retry shortly", reason="replica_unavailable"
    )


async def _tries(call: Callable[..., Any], *args: Any) -> Any:
    for attempt, pause in enumerate((*BACKOFF_S, None)):
        try:
            return await call(*args)
        except Exception as e:
            if not is_gone(e):
                raise
            if pause is None:
                raise _unavailable() from e
            log.warning(
                "ingress: replica gone (%s), retry %d/%d",
                type(e).__name__,
                attempt + 1,
                len(BACKOFF_S),
            )
            await asyncio.sleep(pause)
    raise AssertionError("unreachable")
