#!/usr/bin/env python3
"""A small credproxy worker client: read one credential over credproxy's Unix socket.

Library use::

    from credproxy_client import CredproxyClient, NeedsReauth

    client = CredproxyClient("/run/credproxy/credproxy.sock")
    try:
        secrets = client.get_credential(credential_id, fields=["access_token"])
    except NeedsReauth as e:
        ask_the_user_to_reconnect(e.credential_id)   # retrying will not help
    token = secrets["access_token"]

    # The upstream API just answered 401 with that token: read past credproxy's cache once.
    secrets = client.get_credential(credential_id, fields=["access_token"], no_cache=True)

Command line (what a worker script runs; the value goes to stdout, diagnostics to stderr)::

    python credproxy_client.py --socket PATH [--field NAME] [--no-cache]
                               [--retries N] [--max-wait SECONDS] ID

Without ``--field`` it prints the credential's field names only, never a value. Exit codes:
0 ok, 2 needs_reauth, 3 credential_unusable, 4 not found, 5 unavailable after retries, 1 other.

Needs ``httpx`` (``pip install httpx``); nothing else.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NoReturn, Sequence
from urllib.parse import quote

import httpx

__all__ = [
    "CredproxyClient",
    "Credential",
    "CredproxyError",
    "NeedsReauth",
    "CredentialUnusable",
    "NotFound",
    "Unavailable",
    "mask",
]

DEFAULT_RETRIES = 3
DEFAULT_MAX_WAIT = 5.0


class CredproxyError(Exception):
    """An answer other than 200: ``status``, credproxy's error ``code``, ``message`` and
    ``detail`` (when credproxy gives one: why a credential is unusable, which key was wrong)."""

    def __init__(self, credential_id: str, status: int, code: str, message: str,
                 detail: str | None = None) -> None:
        super().__init__(f"credential {credential_id}: {status} {code}: {message}")
        self.credential_id = credential_id
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail


class NeedsReauth(CredproxyError):
    """``409 needs_reauth``: the provider refused the refresh token and the access token has
    expired. Retrying cannot help; the platform must ask the user to reconnect the account
    (credproxy also reports it as a ``needs_reauth`` event)."""


class CredentialUnusable(CredproxyError):
    """``409 credential_unusable``: the secrets manager holds the credential in a state that
    cannot be handed out (e.g. a Composio account that was disconnected)."""


class NotFound(CredproxyError):
    """``404``: no such credential, or one this caller may not read (they look the same)."""


class Unavailable(CredproxyError):
    """``503`` (``token_unavailable``, ``store_unavailable``, ...) still after the retries;
    ``retry_after`` is the last ``Retry-After`` credproxy sent, in seconds."""

    def __init__(self, credential_id: str, status: int, code: str, message: str,
                 retry_after: float | None) -> None:
        super().__init__(credential_id, status, code, message)
        self.retry_after = retry_after


def mask(value: str) -> str:
    """A value safe to log: its length and nothing of its content."""
    return f"<{len(value)} chars>"


@dataclass(frozen=True)
class Credential:
    """A credential as ``GET /v1/credentials/{id}`` answers it. ``repr`` masks the secrets."""

    id: str
    secrets: Mapping[str, str]
    metadata: Mapping[str, Any]
    expires_at: str | None
    needs_reauth: bool
    cache_status: str | None

    def __repr__(self) -> str:
        shown = {name: mask(value) for name, value in self.secrets.items()}
        return (f"Credential(id={self.id!r}, secrets={shown}, expires_at={self.expires_at!r}, "
                f"needs_reauth={self.needs_reauth}, cache_status={self.cache_status!r})")


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (credproxy sends whole seconds; an HTTP date is ignored)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class CredproxyClient:
    """Reads credentials from credproxy over its Unix socket.

    ``retries``: how many more times a ``503`` is retried; each wait is the answer's
    ``Retry-After`` (1 s if absent) capped at ``max_wait`` seconds. ``sleep`` is for tests and
    for callers that log their waits.
    """

    def __init__(self, socket_path: str, *, retries: int = DEFAULT_RETRIES,
                 max_wait: float = DEFAULT_MAX_WAIT, timeout: float = 10.0,
                 sleep: Callable[[float], None] = time.sleep,
                 on_retry: Callable[[str, float], None] | None = None) -> None:
        self._http = httpx.Client(transport=httpx.HTTPTransport(uds=socket_path),
                                  base_url="http://credproxy", timeout=timeout)
        self.retries = retries
        self.max_wait = max_wait
        self._sleep = sleep
        self._on_retry = on_retry

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "CredproxyClient":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def get_credential(self, credential_id: str, fields: Sequence[str] | None = None, *,
                       no_cache: bool = False) -> dict[str, str]:
        """The credential's secrets (only ``fields`` if given). ``no_cache=True`` sends
        ``Cache-Control: no-cache``: for a caller whose upstream API just refused the value
        it had (a 401), so credproxy reads its secrets manager now. Raises a
        :class:`CredproxyError` subclass for anything but 200."""
        return dict(self.read(credential_id, fields, no_cache=no_cache).secrets)

    def read(self, credential_id: str, fields: Sequence[str] | None = None, *,
             no_cache: bool = False) -> Credential:
        """The whole answer: secrets, metadata, ``expires_at``, ``needs_reauth``."""
        path = "/v1/credentials/" + quote(credential_id, safe="")
        params = {"fields": ",".join(fields)} if fields else None
        headers = {"Cache-Control": "no-cache"} if no_cache else {}
        attempt = 0
        while True:
            response = self._http.get(path, params=params, headers=headers)
            if response.status_code == 200:
                body = response.json()
                return Credential(
                    id=body["id"], secrets=body.get("secrets") or {},
                    metadata=body.get("metadata") or {}, expires_at=body.get("expires_at"),
                    needs_reauth=bool(body.get("needs_reauth")),
                    cache_status=response.headers.get("cache-status"))
            error = _error_of(response)
            code, message = error.get("code", "unknown"), error.get("message", "")
            status = response.status_code
            if status == 503:
                after = _retry_after(response.headers.get("retry-after"))
                if attempt < self.retries:
                    attempt += 1
                    wait = min(after if after is not None else 1.0, self.max_wait)
                    if self._on_retry:
                        self._on_retry(code, wait)
                    self._sleep(wait)
                    continue
                raise Unavailable(credential_id, status, code, message, after)
            if status == 409 and code == "needs_reauth":
                raise NeedsReauth(credential_id, status, code, message)
            if status == 409 and code == "credential_unusable":
                raise CredentialUnusable(credential_id, status, code, message, error.get("detail"))
            if status == 404:
                raise NotFound(credential_id, status, code, message)
            raise CredproxyError(credential_id, status, code, message, error.get("detail"))


def _error_of(response: httpx.Response) -> dict[str, str]:
    try:
        error = response.json().get("error")
        return error if isinstance(error, dict) else {}
    except ValueError:
        return {}


EXIT_OK, EXIT_OTHER, EXIT_NEEDS_REAUTH, EXIT_UNUSABLE, EXIT_NOT_FOUND, EXIT_UNAVAILABLE = (
    0, 1, 2, 3, 4, 5)


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on a usage error; 2 means needs_reauth here, so usage errors are 1."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_OTHER, f"{self.prog}: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(description="Read one credential from credproxy.")
    parser.add_argument("--socket", default=os.environ.get("CREDPROXY_SOCKET"),
                        help="credproxy's Unix socket (default: $CREDPROXY_SOCKET)")
    parser.add_argument("--field", help="print this secret field's value to stdout")
    parser.add_argument("--no-cache", action="store_true",
                        help="read past credproxy's cache (after an upstream 401)")
    parser.add_argument("--retries", type=int, default=DEFAULT_RETRIES,
                        help=f"retries on 503 (default {DEFAULT_RETRIES})")
    parser.add_argument("--max-wait", type=float, default=DEFAULT_MAX_WAIT,
                        help=f"cap on each Retry-After wait, seconds (default {DEFAULT_MAX_WAIT:g})")
    parser.add_argument("id", help="the credential id")
    args = parser.parse_args(argv)
    if not args.socket:
        parser.error("--socket (or $CREDPROXY_SOCKET) is required")

    def say(text: str) -> None:
        print(f"credproxy-client: {text}", file=sys.stderr)

    def on_retry(code: str, wait: float) -> None:
        say(f"503 {code}; retrying in {wait:g}s")

    fields = [args.field] if args.field else None
    try:
        with CredproxyClient(args.socket, retries=args.retries, max_wait=args.max_wait,
                             on_retry=on_retry) as client:
            credential = client.read(args.id, fields, no_cache=args.no_cache)
    except NeedsReauth as e:
        say(f"credential {e.credential_id} needs_reauth: the user must reconnect the account")
        return EXIT_NEEDS_REAUTH
    except CredentialUnusable as e:
        say(f"credential {e.credential_id} credential_unusable: {e.detail or e.message}")
        return EXIT_UNUSABLE
    except NotFound as e:
        say(f"credential {e.credential_id} not found ({e.code})")
        return EXIT_NOT_FOUND
    except Unavailable as e:
        say(f"credential {e.credential_id} unavailable after {args.retries} retries: "
            f"{e.code} (Retry-After: {e.retry_after})")
        return EXIT_UNAVAILABLE
    except CredproxyError as e:
        say(str(e))
        return EXIT_OTHER
    except httpx.HTTPError as e:
        say(f"cannot reach credproxy at {args.socket}: {e}")
        return EXIT_OTHER

    if credential.needs_reauth:
        say(f"warning: credential {credential.id} needs re-authorisation; its token works "
            f"until {credential.expires_at}")
    say(f"credential {credential.id} ({credential.cache_status or 'no cache status'})")
    if args.field:
        value = credential.secrets.get(args.field)
        if value is None:
            say(f"credential {credential.id} has no field {args.field!r}")
            return EXIT_OTHER
        print(value)
    else:
        for name in sorted(credential.secrets):
            print(name)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
