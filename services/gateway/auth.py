"""Who is asking, and what they may do: users, API tokens and the one rule about experiments.

The pure parts (password hashing, token digests, ``may_change``) do no I/O. ``require_user`` is the one place
requests are authenticated: an app-wide Litestar guard over every route except those marked
``opt={PUBLIC: True}`` (``/health``, login) and the schema pages. It looks the presented token up by its
SHA-256 digest; the token itself is never stored, logged or put in an event.

Users and tokens live in Postgres tables the gateway owns (``schemas/readmodel/006_users.sql``); they are not
projections of the event log, so a replay neither rebuilds nor replaces them.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Any

import msgspec
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler

from services.gateway import queries

# The route opt key that exempts a route from authentication.
PUBLIC = "exclude_from_auth"
# Paths served without a token: the OpenAPI schema and its docs pages.
_PUBLIC_PATH = re.compile(r"^/schema(/|$)")
SCHEME = "BearerToken"
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="kiln"'}
NOT_SIGNED_IN = "not signed in: send 'Authorization: Bearer <token>' (get one with `kiln user login`)"
BAD_TOKEN = "the token is unknown, expired or revoked: sign in again (`kiln user login`)"
SESSION_TTL_S = 30 * 24 * 3600  # a login's token; named tokens live until revoked unless given an expiry
MIN_PASSWORD = 8
_USERNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}")

# argon2id with the library's defaults (RFC 9106 low-memory profile).
_hasher = PasswordHasher()
# Verified against when a username is unknown, so a wrong name takes as long as a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """The authenticated user of a request and the token it came with."""

    user_id: int
    username: str
    admin: bool
    token_id: int


def hash_password(password: str) -> str:
    """An argon2id hash of ``password`` (salted; the encoded string carries its parameters)."""
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Whether ``password`` matches the stored hash; an unknown user (None) costs the same time and fails."""
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def new_token() -> str:
    """A fresh random API token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """What is stored of a token: its SHA-256, hex. A token is random, so no salt or slow hash is needed."""
    return hashlib.sha256(token.encode()).hexdigest()


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


def check_username(username: str) -> str | None:
    """Why a username is not acceptable, or None."""
    if not _USERNAME.fullmatch(username):  # fullmatch: "$" would let a trailing newline through
        return "a username is 1-64 letters, digits or _.@- (not starting with . @ or -)"
    return None


def check_password(password: str) -> str | None:
    """Why a new password is not acceptable, or None."""
    if len(password) < MIN_PASSWORD:
        return f"a password needs at least {MIN_PASSWORD} characters"
    return None


def may_change(principal: Principal, owner: str) -> bool:
    """The rights rule: an experiment (and its trials) may be changed by its owner or an admin, who alone may
    also see and delete its checkpoints and code; anyone signed in may read the rest."""
    return principal.admin or principal.username == owner


def may_revoke(principal: Principal, token_user_id: int) -> bool:
    """A token may be revoked by the user it belongs to or an admin."""
    return principal.admin or principal.user_id == token_user_id


async def require_user(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """The app's one guard: authenticates every request that is not public. ``request.user`` becomes the
    ``Principal``, ``request.auth`` the token's id. No or a bad token: 401. Postgres down: 503 (``GatewayDeps.db``).

    A guard rather than a middleware: it runs inside the app's error handling, so a 401 or 503 from here
    carries a request id like any other answer."""
    if handler.opt.get(PUBLIC) or _PUBLIC_PATH.match(connection.scope["path"]):
        return
    token = bearer_token(connection.headers.get("authorization"))
    if token is None:
        raise NotAuthorizedException(NOT_SIGNED_IN, headers=CHALLENGE)
    deps = connection.app.state.deps
    async with deps.db() as conn:
        row = await queries.principal_for_token(conn, token_digest(token))
    if row is None:
        raise NotAuthorizedException(BAD_TOKEN, headers=CHALLENGE)
    principal = Principal(**row)
    connection.scope["user"] = principal
    connection.scope["auth"] = principal.token_id
