"""A Starlette authentication backend for tests: ``X-Token`` -> a user object whose id is an
attribute (``scope["user"].id``), as an app's ``AuthenticationMiddleware`` sets it."""

from __future__ import annotations

from starlette.authentication import AuthCredentials, AuthenticationBackend, BaseUser

TOKENS = {"t-alice": "alice", "t-bob": "bob"}


class User(BaseUser):
    """A user object whose id is an attribute, as Starlette's authentication backends return."""

    def __init__(self, user_id: str) -> None:
        self.id = user_id

    @property
    def is_authenticated(self) -> bool:
        return True


class TokenBackend(AuthenticationBackend):
    async def authenticate(self, conn):
        token = conn.headers.get("x-token")
        return (AuthCredentials(["authenticated"]), User(TOKENS[token])) if token else None
