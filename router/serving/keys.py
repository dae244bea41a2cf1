"""API keys: who may call what.

A key is ``crk_<id>_<secret>``: ``id`` (12 hex digits) names the key in lists, logs and the audit
trail; ``secret`` (32 random bytes, URL-safe base64) is shown once, when the key is created. The
key file holds, per key, its id, name, tenant, scopes, limits and the SHA-256 of the whole key,
never the key itself. A plain hash suffices (no salt, no key stretching): the secret is 256
random bits, not a password a dictionary could guess; a fast hash keeps authentication off the
request's latency (GitHub and Stripe store their tokens this way).

The file is JSON, rewritten whole by ``caprouter keys`` (under an exclusive lock, to a temporary
file that is fsync'ed and renamed over it). The server reads it again whenever it changes (the
file's inode, size and mtime are compared on every authentication, a stat call), so a key created
or revoked takes effect on the next request, without a restart.

Authentication is on when the key file exists, or once it has existed in this process, or when
``auth.required`` says so. With no file, the server is open (every caller may do everything, as
before keys existed) and says so at start-up. A file whose keys are all revoked refuses everyone
rather than opening up, and so does a file that disappears while the server runs (moved aside
for an edit, a volume not mounted yet): it never fails open.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from router.core.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated, Unavailable

SCOPES = ("route", "generate", "feedback", "onboard", "metrics", "admin")
Scope = Literal["route", "generate", "feedback", "onboard", "metrics", "admin"]
PERIODS = ("day", "month")
FORMAT = 1
_KEY = re.compile(r"^crk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ID = re.compile(r"^[0-9a-f]{12}$")


@dataclass(frozen=True)
class Limits:
    """A key's limits; None: unlimited."""

    requests_per_s: float | None = None        # token bucket; burst: max(1, requests_per_s)
    output_tokens_per_min: int | None = None   # token bucket over Generate's output tokens
    budget: float | None = None                # spend per period, in the server's cost unit
    budget_period: str = "day"                 # "day" or "month" (UTC)

    def __post_init__(self) -> None:
        for name in ("requests_per_s", "output_tokens_per_min", "budget"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and v > 0 and v < float("inf")):
                raise InvalidArgument(f"{name} must be a positive number, got {v!r}")
        if self.budget_period not in PERIODS:
            raise InvalidArgument(f"budget period must be one of {', '.join(PERIODS)}, got {self.budget_period!r}")


@dataclass(frozen=True)
class ApiKey:
    """One key's record in the key file (the hash, never the key)."""

    id: str
    name: str
    tenant: str
    scopes: tuple[str, ...]
    sha256: str
    created_unix: float
    limits: Limits = field(default_factory=Limits)
    revoked_unix: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_unix is None

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["scopes"] = list(self.scopes)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ApiKey:
        return cls(id=d["id"], name=d["name"], tenant=d["tenant"], scopes=tuple(d["scopes"]), sha256=d["sha256"],
                   created_unix=float(d["created_unix"]), limits=Limits(**(d.get("limits") or {})),
                   revoked_unix=d.get("revoked_unix"))


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the key that authenticated it (``key`` None: an open server)."""

    key: ApiKey | None = None

    @property
    def name(self) -> str:
        return self.key.name if self.key else ""

    @property
    def tenant(self) -> str:
        return self.key.tenant if self.key else ""

    @property
    def limits(self) -> Limits:
        return self.key.limits if self.key else Limits()


OPEN = Caller()


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _validate(name: str, tenant: str, scopes: tuple[str, ...]) -> None:
    if not _NAME.match(name):
        raise InvalidArgument(f"key name {name!r}: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if _ID.match(name):
        # A name shaped like a key id would make `revoke` and `retract` ambiguous.
        raise InvalidArgument(f"key name {name!r} looks like a key id (12 hex digits); choose another")
    if not _NAME.match(tenant):
        raise InvalidArgument(f"tenant {tenant!r}: 1-64 letters, digits, '.', '_' or '-'")
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise InvalidArgument(f"scopes must be some of {', '.join(SCOPES)}; got {', '.join(scopes) or 'none'}")


class KeyFile:
    """The key file: read (and re-read when it changes) by the server, rewritten by the CLI."""

    def __init__(self, path: str | Path, *, required: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._by_id: dict[str, ApiKey] = {}
        self._seen = required           # authentication stays on once the file has been seen

    # ---- reading ----------------------------------------------------------------------------------
    def enabled(self) -> bool:
        """Authentication is on: the key file exists, has existed, or is required."""
        if not self._seen and self.path.exists():
            self._seen = True
        return self._seen

    def keys(self) -> list[ApiKey]:
        self._refresh()
        return sorted(self._by_id.values(), key=lambda k: k.created_unix)

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._seen:
                raise Unavailable(f"the server's key file {self.path.name} is missing; every call is refused "
                                  "until it is back (ask its operator)") from None
            with self._lock:
                self._stamp, self._by_id = None, {}
            return
        self._seen = True
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if stamp == self._stamp:
                return
            self._by_id = {k.id: k for k in _read(self.path)}
            self._stamp = stamp

    def authenticate(self, token: str | None) -> Caller:
        """The caller a bearer token names. Unauthenticated: no token, not a caprouter key, unknown,
        or revoked (the message never echoes the token)."""
        if not token:
            raise Unauthenticated("this server requires an API key: send 'authorization: Bearer <key>' "
                                  "(HTTP: the Authorization header)")
        m = _KEY.match(token)
        if m is None:
            raise Unauthenticated("the API key is malformed (caprouter keys look like crk_<id>_<secret>)")
        self._refresh()
        k = self._by_id.get(m.group(1))
        if k is None or not hmac.compare_digest(k.sha256, hash_key(token)):
            raise Unauthenticated(f"unknown API key crk_{m.group(1)}_...")
        if not k.active:
            raise Unauthenticated(f"API key {k.id} ({k.name}) was revoked")
        return Caller(k)

    # ---- writing (the CLI) -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _editing(self) -> Iterator[dict[str, ApiKey]]:
        """Read-modify-write under an exclusive lock, written atomically and durably."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)
            keys = {k.id: k for k in _read(self.path)} if self.path.exists() else {}
            yield keys
            data = {"format": FORMAT, "keys": [k.to_json() for k in sorted(keys.values(), key=lambda k: k.created_unix)]}
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o600)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def create(self, name: str, *, tenant: str | None = None, scopes: tuple[str, ...] = ("route", "generate"),
               limits: Limits | None = None) -> tuple[ApiKey, str]:
        """A new key: (its record, the key itself, which only the caller now holds)."""
        tenant = tenant or name
        _validate(name, tenant, tuple(scopes))
        with self._editing() as keys:
            if any(k.name == name and k.active for k in keys.values()):
                raise InvalidArgument(f"an active key is already named {name!r}; revoke it first or choose another name")
            kid = secrets.token_hex(6)
            while kid in keys:
                kid = secrets.token_hex(6)
            token = f"crk_{kid}_{secrets.token_urlsafe(32)}"
            rec = ApiKey(kid, name, tenant, tuple(s for s in SCOPES if s in scopes), hash_key(token), time.time(),
                         limits or Limits())
            keys[kid] = rec
        return rec, token

    def revoke(self, ref: str) -> ApiKey:
        """Revoke a key by id or by name (its active key; names cannot look like ids)."""
        with self._editing() as keys:
            k = keys.get(ref) or next((k for k in keys.values() if k.name == ref and k.active), None)
            if k is None:
                raise NotFound(f"no key with id or name {ref!r}")
            if k.active:
                k = keys[k.id] = replace(k, revoked_unix=time.time())
        return k


def _read(path: Path) -> list[ApiKey]:
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
        return [ApiKey.from_json(d) for d in data["keys"]]
    except FileNotFoundError:
        return []
    except OSError as e:
        raise Unavailable(f"the server's key file {path.name} cannot be read ({e.strerror}); ask its operator") from None
    except (ValueError, KeyError, TypeError, InvalidArgument) as e:
        # Refuse everyone rather than guess: a damaged key file must not open the server.
        raise Unavailable(f"the server's key file {path.name} is unreadable ({e}); ask its operator") from None


def require(caller: Caller, scope: str) -> None:
    """PermissionDenied unless the caller's key has ``scope`` (an open server allows everything)."""
    if caller.key is not None and not caller.key.allows(scope):
        raise PermissionDenied(f"API key {caller.key.id} ({caller.key.name}) lacks the {scope!r} scope "
                               f"(it has: {', '.join(caller.key.scopes)})")
