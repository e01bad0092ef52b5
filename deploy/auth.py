"""Bearer-token auth of the HTTP API, failing closed.

Two tokens, each read from an environment variable of the replica: the API token (every
endpoint but ``/healthz`` and the web page) and the admin token (``POST /v1/reload``; it is
accepted wherever the API token is). The builder (:func:`deploy.app.build_app`) reads both where
the application is built and pins them into the ingress deployment's ``runtime_env``, so every
ingress replica has them whatever node it starts on.

Failing closed: a replica that finds no API token refuses to start (:class:`AuthConfigError`
from its constructor) unless the application says ``allow_anonymous: true``; then it serves
without a token and says so loudly in its log. Without an admin token, reloads are refused
(the poller still follows ``LATEST``), except on an anonymous service.
"""

import hmac
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from deploy.queries import RequestError

log = logging.getLogger("ray.serve")


class AuthConfigError(RuntimeError):
    """The service would run without a token although anonymous access was not allowed."""


@dataclass(frozen=True)
class Tokens:
    """The tokens a replica checks; ``None`` = not configured."""

    api: bytes | None
    admin: bytes | None
    anonymous: bool  # no API token, and the application allows that

    @property
    def mode(self) -> str:
        return "anonymous" if self.anonymous else "token"


def read_secret(env_name: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The value of ``env_name`` stripped, ``None`` when unnamed, unset or blank."""
    if not env_name:
        return None
    value = (os.environ if environ is None else environ).get(env_name, "").strip()
    return value or None


def resolve_tokens(
    api_env: str | None,
    admin_env: str | None,
    allow_anonymous: bool,
    environ: Mapping[str, str] | None = None,
) -> Tokens:
    """The tokens from the environment, refusing to go on without one unless allowed.

    Raises:
        AuthConfigError: no API token and ``allow_anonymous`` is false.
    """
    api = read_secret(api_env, environ)
    admin = read_secret(admin_env, environ)
    if api is None and not allow_anonymous:
        where = f"${api_env}" if api_env else "no auth_token_env"
        raise AuthConfigError(
            f"refusing to start without an API token ({where} is unset or empty): set the "
            "variable, or set allow_anonymous: true in the application's args to serve "
            "without auth"
        )
    return Tokens(
        api=api.encode("utf-8") if api else None,
        admin=admin.encode("utf-8") if admin else None,
        anonymous=api is None,
    )


def announce(tokens: Tokens, api_env: str | None, admin_env: str | None) -> None:
    """Log how this replica authenticates; anonymous access as a warning that stands out."""
    if tokens.anonymous:
        log.warning(
            "!!! ANONYMOUS ACCESS: this service answers every request without a token "
            "(allow_anonymous is true and $%s is not set). Never expose it beyond loopback. !!!",
            api_env,
        )
    else:
        log.info("ingress: bearer-token auth on (token from $%s)", api_env)
    if tokens.admin is None:
        log.info(
            "ingress: no admin token ($%s unset): POST /v1/reload is %s",
            admin_env,
            "open (anonymous service)" if tokens.anonymous else "refused",
        )


def _bearer(header: str) -> bytes:
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise RequestError(
            401,
            "missing bearer token: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return given.strip().encode("utf-8", "surrogateescape")


def _matches(given: bytes, token: bytes | None) -> bool:
    return token is not None and hmac.compare_digest(given, token)


def check_api(tokens: Tokens, header: str) -> None:
    """Refuse (401 without credentials, 403 with a wrong token) unless the ``Authorization``
    header carries the API or the admin token; compared in constant time."""
    if tokens.anonymous:
        return
    given = _bearer(header)
    if not (_matches(given, tokens.api) or _matches(given, tokens.admin)):
        raise RequestError(403, "invalid bearer token")


def check_admin(tokens: Tokens, header: str) -> None:
    """Refuse unless the header carries the admin token (open on an anonymous service without
    an admin token; refused on any other service without one)."""
    if tokens.admin is None:
        if tokens.anonymous:
            return
        _bearer(header)  # 401 first for a request without credentials
        raise RequestError(403, "this endpoint needs the admin token, and none is configured")
    given = _bearer(header)
    if not _matches(given, tokens.admin):
        raise RequestError(403, "this endpoint needs the admin token")
