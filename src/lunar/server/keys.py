"""Virtual keys: minted once, stored as a sha256 hash, looked up by that hash.

A lookup by hash reveals nothing about the key through timing (finding a key from timings
would mean inverting sha256); the one comparison against a secret, the master key, uses
``hmac.compare_digest``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from typing import Any

from .._catalog import Catalog
from .._client import LUNAR_KEY_PREFIX as KEY_PREFIX
from .._errors import AuthenticationError, BadRequestError, ConflictError, NotFoundError
from .storage import KEY_FIELDS, KeyRecord, Storage

KEY_BODY_CHARS = 32
KEY_LENGTH = len(KEY_PREFIX) + KEY_BODY_CHARS
_KEY_RE = re.compile(r"^lk-[A-Za-z0-9_-]{32}$")
MASTER_ID = "master"


def new_key() -> str:
    """``lk-`` and 32 random URL-safe characters (192 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(24)


# Every request hashes its key. A fresh ``hashlib.sha256()`` looks the algorithm up in OpenSSL
# each time, much code that a request arriving after a pause runs cold (~25 µs, the largest
# part of authentication, bench/ttft_steps.py --fine); a copy of one made here skips that.
_SHA256 = hashlib.sha256()


def hash_key(key: str) -> str:
    """sha256 of the key, in hex: what storage keeps."""
    h = _SHA256.copy()
    h.update(key.encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def hint(key: str) -> str:
    """What lists show of a key: enough to recognise it, not to use it."""
    return f"{key[:6]}…{key[-4:]}"


def well_formed(key: str) -> bool:
    return _KEY_RE.match(key) is not None


def is_master(given: str, master: str | None) -> bool:
    if not master:
        return False
    return hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"), master.encode("utf-8", "surrogateescape")
    )


def credential(headers: Mapping[bytes, bytes]) -> str | None:
    """The key a request presents: ``x-api-key: KEY`` or ``Authorization: Bearer KEY``."""
    value = headers.get(b"x-api-key")
    if value:
        return value.decode("latin-1").strip()
    auth = headers.get(b"authorization")
    if auth:
        scheme, _, token = auth.decode("latin-1").strip().partition(" ")
        if scheme.lower() == "bearer":
            return token.strip()
        return ""
    return None


class KeyRing:
    """The keys in memory, by hash and by id, with each key's allowed model names resolved
    against the catalogue (so ``gpt-4o-mini`` allows ``openai/gpt-4o-mini`` too)."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog
        self._by_hash: dict[str, KeyRecord] = {}
        self._by_id: dict[str, KeyRecord] = {}
        self._allowed: dict[str, frozenset[str]] = {}
        # Every put() gets a number; a reload keeps the puts made while it was reading.
        self.version = 0
        self._recent: dict[str, tuple[int, KeyRecord]] = {}

    def replace_all(self, records: Iterable[KeyRecord], as_of: int | None = None) -> None:
        """Install the keys read from storage. ``as_of`` is ``version`` from before the read
        began: a key put (created, revoked) after that is newer than what was read, or the
        same, and stays as put, so a reload racing an admin call can neither bring back a
        revoked key nor drop a new one. A revocation read from storage always wins (keys
        are never un-revoked)."""
        by_hash: dict[str, KeyRecord] = {}
        by_id: dict[str, KeyRecord] = {}
        for rec in records:
            by_hash[rec.key_hash] = rec
            by_id[rec.id] = rec
        if as_of is None:
            self._recent = {}
        else:
            self._recent = {i: (v, r) for i, (v, r) in self._recent.items() if v > as_of}
            for key_id, (_, rec) in self._recent.items():
                read = by_id.get(key_id)
                if read is None or read.revoked_at is None or rec.revoked_at is not None:
                    by_hash[rec.key_hash] = by_id[key_id] = rec
        self._by_hash, self._by_id = by_hash, by_id
        self._allowed = {
            rec.id: self._canonical_set(rec.models)
            for rec in by_id.values()
            if rec.models is not None
        }

    def put(self, rec: KeyRecord) -> None:
        """A key created or changed by this process (already written to storage)."""
        self.version += 1
        self._recent[rec.id] = (self.version, rec)
        self._by_hash[rec.key_hash] = rec
        self._by_id[rec.id] = rec
        if rec.models is not None:
            self._allowed[rec.id] = self._canonical_set(rec.models)
        else:
            self._allowed.pop(rec.id, None)

    def get(self, key_id: str) -> KeyRecord | None:
        return self._by_id.get(key_id)

    def all(self) -> list[KeyRecord]:
        return sorted(self._by_id.values(), key=lambda r: r.created_at)

    def __len__(self) -> int:
        return len(self._by_id)

    def authenticate(self, given: str | None, master: str | None) -> KeyRecord:
        """The key record for a presented credential, or ``AuthenticationError`` saying
        what is wrong (missing, malformed, unknown, revoked)."""
        if given is None:
            raise AuthenticationError(
                "Missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY' "
                "(create keys with `lunar keys create` or POST /admin/keys)",
                code="missing_api_key",
            )
        if is_master(given, master):
            return MASTER_KEY
        # The length first, so that no long header is hashed; the pattern only to say why a
        # key that is not found was refused (a request that runs need not pay for it).
        rec = self._by_hash.get(hash_key(given)) if len(given) == KEY_LENGTH else None
        if rec is None and not well_formed(given):
            raise AuthenticationError(
                f"Malformed API key: Lunar keys are '{KEY_PREFIX}' followed by "
                f"{KEY_BODY_CHARS} characters",
                code="invalid_api_key",
            )
        if rec is None:
            raise AuthenticationError(
                f"Invalid API key {hint(given)}: no such key on this gateway",
                code="invalid_api_key",
            )
        if rec.revoked_at is not None:
            raise AuthenticationError(
                f"API key {hint(given)} ({rec.name}) was revoked", code="revoked_api_key"
            )
        return rec

    def allows(self, rec: KeyRecord, model: str) -> bool:
        allowed = self._allowed.get(rec.id)
        if allowed is None:
            return True
        if model in allowed:
            return True
        return self._canonical(model) in allowed

    def allowed_names(self, rec: KeyRecord) -> frozenset[str] | None:
        return self._allowed.get(rec.id)

    def _canonical(self, name: str) -> str:
        try:
            deps = self._catalog.resolve(name)
        except NotFoundError:
            return name
        return deps[0].model if deps else name

    def _canonical_set(self, names: Iterable[str]) -> frozenset[str]:
        out = set()
        for name in names:
            out.add(name)
            out.add(self._canonical(name))
        return frozenset(out)


MASTER_KEY = KeyRecord(id=MASTER_ID, name="master", key_hash="", hint="master", created_at=0.0)


MAX_LIMIT = 10**12  # rpm, tpm and budget_usd above this are not limits


def _positive_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIMIT:
        raise BadRequestError(
            f"'{name}' must be an integer from 1 to {MAX_LIMIT} or null, got {value!r}",
            param=name,
        )
    return value


def _unicode(value: str) -> bool:
    """Whether a JSON string is valid Unicode (JSON allows lone surrogates; storage does not)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _fields(body: Any, catalog: Catalog, *, creating: bool) -> dict[str, Any]:
    """The key fields ``body`` gives, checked: all of them when creating (absent ones as
    ``None``), only those present when changing a key."""
    if not isinstance(body, Mapping):
        raise BadRequestError("The request body must be a JSON object", param=None)
    unknown = set(body) - set(KEY_FIELDS)
    if unknown:
        field = sorted(unknown)[0]
        raise BadRequestError(
            f"Unknown field '{field}': keys take name, rpm, tpm, budget_usd, models",
            param=field,
        )
    out: dict[str, Any] = {}
    if creating or "name" in body:
        name = body.get("name")
        if (
            not isinstance(name, str)
            or not name.strip()
            or len(name) > 200
            or not _unicode(name)
            or not name.isprintable()  # a newline or tab would break every table of keys
        ):
            raise BadRequestError(
                "'name' must be a non-empty string of printable characters (at most 200)",
                param="name",
            )
        out["name"] = name.strip()
    for field in ("rpm", "tpm"):
        if creating or field in body:
            out[field] = _positive_int(body, field)
    if creating or "budget_usd" in body:
        budget = body.get("budget_usd")
        if budget is not None and (
            isinstance(budget, bool)
            or not isinstance(budget, (int, float))
            or not 0 <= budget <= MAX_LIMIT
        ):
            raise BadRequestError(
                f"'budget_usd' must be a number from 0 to {MAX_LIMIT} or null, got {budget!r}",
                param="budget_usd",
            )
        out["budget_usd"] = None if budget is None else float(budget)
    if creating or "models" in body:
        out["models"] = _models(body.get("models"), catalog)
    return out


def _models(models: Any, catalog: Catalog) -> list[str] | None:
    if models is None:
        return None
    if isinstance(models, str):
        models = [m.strip() for m in models.split(",") if m.strip()]
    if not isinstance(models, list) or not all(
        isinstance(m, str) and m and _unicode(m) for m in models
    ):
        raise BadRequestError("'models' must be a list of model names or null", param="models")
    if not models:  # a key every model would refuse
        raise BadRequestError(
            "'models' must name at least one model, or be null (every model)",
            param="models",
        )
    for i, m in enumerate(models):
        try:
            catalog.resolve(m)
        except NotFoundError as e:
            raise BadRequestError(e.message, param=f"models[{i}]") from None
    return models


def key_from_request(body: Any, catalog: Catalog) -> tuple[str, KeyRecord]:
    """Validate ``POST /admin/keys`` and mint the key: ``(key, record)``."""
    fields = _fields(body, catalog, creating=True)
    key = new_key()
    rec = KeyRecord(
        id="key_" + secrets.token_hex(8),
        key_hash=hash_key(key),
        hint=hint(key),
        created_at=time.time(),
        **fields,
    )
    return key, rec


def changes_from_request(body: Any, catalog: Catalog) -> dict[str, Any]:
    """Validate ``PATCH /admin/keys/{id}``: the fields to change (``null`` lifts a limit).
    The secret, the id and the spend stay; a revoked key stays revoked."""
    changes = _fields(body, catalog, creating=False)
    if not changes:
        raise BadRequestError(
            "Nothing to change: give one or more of name, rpm, tpm, budget_usd, models",
            param=None,
        )
    return changes


def update_key(storage: Storage, key_id: str, changes: Mapping[str, Any]) -> KeyRecord:
    """Write ``changes`` (from ``changes_from_request``) to a key: the key as stored after;
    ``NotFoundError`` for no such key, ``ConflictError`` for a revoked one (left as it is).
    For the admin API and ``lunar keys update --db`` alike."""
    rec = storage.update_key(key_id, changes)
    if rec is None:
        raise NotFoundError(f"No key with id '{key_id}'", param="key_id")
    if rec.revoked:
        raise ConflictError(
            f"Key '{key_id}' ({rec.name}) is revoked: it cannot be changed, create a "
            "new key instead",
            param="key_id",
            code="key_revoked",
        )
    return rec
