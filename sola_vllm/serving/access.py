"""Who may use the edit API: the admin token and the loopback rule.

Edit-management routes (every path under `/v1/sola/`) carry their own secret, separate from
vLLM's `--api-key` for inference: whoever may ask for completions must not thereby be able to
change what the model answers. The token is given to `sola-vllm serve` with `--admin-token` or
`SOLA_ADMIN_TOKEN` and reaches the server process through its environment only (never its argv,
which `ps` shows, nor a log line). Clients send it in the `X-Sola-Admin-Token` header.

Without a token the routes are open, which is allowed only on a loopback address (127.0.0.0/8,
::1, localhost) or a Unix socket: `serve` refuses to start otherwise, and the endpoint plugin
checks again at start-up (it may be loaded by a plain `vllm serve`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from dataclasses import dataclass

ADMIN_TOKEN_ENV = "SOLA_ADMIN_TOKEN"
TOKEN_HEADER = "X-Sola-Admin-Token"
MIN_TOKEN_LENGTH = 16  # e.g. `openssl rand -hex 16` gives 32; short tokens are guessable
MAX_TOKEN_LENGTH = 1024


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`; None or "" (every interface) is not."""
    if not host:
        return False
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to a public address
        return False


def _digest(value: bytes) -> bytes:
    # comparing digests keeps the comparison's time independent of the token's length too
    return hashlib.sha256(value).digest()


@dataclass(slots=True, repr=False)
class AccessConfig:
    """token: the admin token, or None for open routes (loopback only); host: where the
    server listens (None: every interface); unix_socket: listening on a Unix socket instead."""

    token: str | None
    host: str | None
    unix_socket: bool = False

    def __post_init__(self):
        if self.token is not None:
            self._check_token(self.token)
        elif not (self.unix_socket or is_loopback(self.host)):
            raise ValueError(
                f"the sola-vllm edit API would be open to the network on host {self.host!r} "
                f"without an admin token: set {ADMIN_TOKEN_ENV} (or `sola-vllm serve "
                "--admin-token`), or listen on a loopback address (--host 127.0.0.1)")

    @staticmethod
    def _check_token(token: str) -> None:
        # the message never shows the token itself, only what is wrong with it
        if not MIN_TOKEN_LENGTH <= len(token) <= MAX_TOKEN_LENGTH:
            raise ValueError(f"the admin token must have {MIN_TOKEN_LENGTH} to "
                             f"{MAX_TOKEN_LENGTH} characters, got {len(token)}")
        if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
            raise ValueError("the admin token must be printable ASCII without spaces (it is "
                             "sent in an HTTP header)")

    def __repr__(self) -> str:  # never print the token
        token = "set" if self.token else "none"
        return f"AccessConfig(token={token}, host={self.host!r}, unix_socket={self.unix_socket})"

    @classmethod
    def from_env(cls, host: str | None, unix_socket: bool = False,
                 environ=os.environ) -> AccessConfig:
        return cls(environ.get(ADMIN_TOKEN_ENV) or None, host, unix_socket)

    @property
    def open(self) -> bool:
        return self.token is None

    def allows(self, presented: list[bytes]) -> bool:
        """`presented`: every value of the token header in the request (one is expected)."""
        if self.token is None:
            return True
        if len(presented) != 1:
            return False
        return hmac.compare_digest(_digest(presented[0]), _digest(self.token.encode()))
