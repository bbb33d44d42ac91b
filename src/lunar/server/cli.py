"""``lunar serve``, ``lunar keys create|list|update|revoke`` and ``lunar usage``.

``add_server_commands(subparsers)`` adds them to the ``lunar`` command's parser; ``python -m
lunar.server`` runs them on their own. ``keys`` and ``usage`` talk to a running gateway's
admin API (``--url``, default ``$LUNAR_GATEWAY_URL``, ``$LUNAR_BASE_URL`` as the SDK reads
it, or http://127.0.0.1:4000, with ``$LUNAR_MASTER_KEY``, else ``$LUNAR_API_KEY`` holding the
master key) or, with ``--db``, work on the database file directly (a running gateway sees such
changes within ``keys_refresh_seconds``).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import socket
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from .._catalog import checked_base_url
from .config import LOG_LEVELS, ConfigError, ServerConfig, load_config

DEFAULT_URL = "http://127.0.0.1:4000"


def add_server_commands(subparsers: Any) -> None:
    """Define ``serve``, ``keys`` and ``usage`` on ``subparsers`` (from
    ``ArgumentParser.add_subparsers``)."""
    serve = subparsers.add_parser(
        "serve",
        help="run the gateway: OpenAI- and Anthropic-compatible API with keys, limits, ledger",
        description="Run the Lunar gateway. Needs LUNAR_MASTER_KEY in the environment.",
    )
    serve.add_argument("--host", default=None, help="interface (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 4000; 0: any)")
    serve.add_argument(
        "--db",
        default=None,
        help="SQLite file for keys and ledger (default ./lunar.db, or $LUNAR_DB)",
    )
    serve.add_argument("--config", default=None, help="lunar.toml (or $LUNAR_CONFIG)")
    serve.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective configuration (secrets masked) and exit",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes (only 1: limits and budgets are in-process)",
    )
    serve.add_argument(
        "--log-level", default=None, type=str.lower, choices=LOG_LEVELS, help="default warning"
    )
    serve.set_defaults(func=cmd_serve)

    keys = subparsers.add_parser("keys", help="create, list, update and revoke the gateway's keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    create = ksub.add_parser("create", help="mint a key (shown once)")
    create.add_argument("--name", required=True)
    create.add_argument("--rpm", type=int, default=None, help="requests per minute")
    create.add_argument("--tpm", type=int, default=None, help="tokens per minute")
    create.add_argument("--budget-usd", type=_usd, default=None, help="budget in USD")
    create.add_argument("--models", default=None, help="allowed models, comma-separated")
    create.set_defaults(func=cmd_keys_create)
    lst = ksub.add_parser("list", help="list keys with their limits and spend")
    lst.set_defaults(func=cmd_keys_list)
    update = ksub.add_parser(
        "update",
        help="change a key's name, limits or models (its secret and spend stay)",
        description="Change a key in place: give only what changes. 'none' lifts a limit "
        "(--models none: every model).",
    )
    update.add_argument("key_id")
    update.add_argument("--name", default=argparse.SUPPRESS)
    update.add_argument("--rpm", type=_or_none(int), default=argparse.SUPPRESS, metavar="N|none")
    update.add_argument("--tpm", type=_or_none(int), default=argparse.SUPPRESS, metavar="N|none")
    update.add_argument(
        "--budget-usd", type=_or_none(_usd), default=argparse.SUPPRESS, metavar="X|none"
    )
    update.add_argument(
        "--models", type=_or_none(str), default=argparse.SUPPRESS, metavar="a,b|none"
    )
    update.set_defaults(func=cmd_keys_update)
    revoke = ksub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    revoke.set_defaults(func=cmd_keys_revoke)
    for p in (create, lst, update, revoke):
        _target_args(p)
    for p in (create, update):  # what --models may name, checked here with --db
        p.add_argument(
            "--config",
            default=None,
            help="lunar.toml whose models and aliases --models may name (with --db; "
            "default $LUNAR_CONFIG; over HTTP the gateway checks them)",
        )

    usage = subparsers.add_parser("usage", help="print usage and cost from the ledger")
    usage.add_argument("--key", default=None, help="a key id or name")
    usage.add_argument("--model", default=None, help="requested model")
    usage.add_argument("--since", default=None, help="unix time, ISO 8601, or 24h / 7d ago")
    usage.add_argument("--until", default=None)
    usage.add_argument(
        "--group-by",
        default="key,model",
        help="none, or a list of key, model, served_model, provider, status, "
        "route, day, hour (default key,model)",
    )
    usage.add_argument("--limit", type=int, default=1000)
    _target_args(usage)
    usage.set_defaults(func=cmd_usage)


def _target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        default=None,
        help=f"gateway URL (default $LUNAR_GATEWAY_URL, $LUNAR_BASE_URL or {DEFAULT_URL})",
    )
    p.add_argument("--db", default=None, help="work on this database file directly")
    p.add_argument("--json", action="store_true", help="print JSON")


def _err(message: str) -> None:
    print(f"Error: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# serve


def _config(args: argparse.Namespace, **flags: Any) -> ServerConfig:
    return load_config(getattr(args, "config", None), **flags)


# Net new objects the cyclic GC lets accumulate before a young collection (CPython's
# default: 700). A successful request leaves no reference cycle, so most collections find
# nothing and cost only their walk: with 1,000 streams in flight, ~300 young collections of
# ~1.2 ms and ~27 older ones in a 6 s run, ~9 % of the core. At 20,000 each young one walks
# more, but they are ~60x fewer and no older one ran: the GC's total time falls ~10x. What
# does form a cycle (an error's traceback; an error's `attempts` hold the error itself)
# waits longer to be freed, up to a full collection once it has aged past the young
# generations.
GC_THRESHOLD = (20_000, 10, 10)


def tune_gc() -> None:
    """For the gateway's own process, before it serves. Keep what is loaded by now (modules,
    the catalogue, the app: it lives as long as the process) out of the cyclic GC's full
    collections, which then take microseconds instead of the 4-5 ms that stall every
    request in flight (what is frozen is never collected, even if it becomes garbage); and
    collect less often (``GC_THRESHOLD``; on an interpreter with the incremental GC, 3.14's,
    only its first number counts)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        cfg = _config(args, host=args.host, port=args.port, db=args.db, log_level=args.log_level)
        cfg.check_base_urls(cfg.build_catalog())
        if args.print_config:
            sys.stdout.write(cfg.render())
            return 0
    except ConfigError as e:
        _err(str(e))
        return 2
    from .storage import unreadable_database

    problem = unreadable_database(cfg.db)  # a path with no file is a new gateway's database
    if problem:
        _err(
            f"{cfg.setting('db')} {cfg.db!r}: {problem} (give the gateway's SQLite file, or "
            "a path with no file yet to start with an empty one)"
        )
        return 2
    if not cfg.master_key:
        _err(
            "LUNAR_MASTER_KEY is not set. The gateway needs a master key for its admin "
            "routes: export LUNAR_MASTER_KEY=$(python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))') and start again."
        )
        return 2
    if args.workers != 1:
        _err(
            "--workers must be 1: rate limits, budgets and keys live in the gateway process. "
            "Run several gateways behind a load balancer only with a shared backend."
        )
        return 2
    try:
        import uvicorn  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        _err("The gateway needs uvicorn: pip install 'lunar[server]'")
        return 2
    from .app import create_app
    from .serving import GatewayServer

    level = cfg.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(cfg.master_key) < 16:
        logging.getLogger("lunar.server").warning(
            "LUNAR_MASTER_KEY is short (%d characters): use 32 random characters or more",
            len(cfg.master_key),
        )
    app = create_app(cfg)
    # The database is opened (created, directories and all, when there is none) before
    # anything listens: a path it cannot be made at ('/proc/x.db', under a file, a device)
    # is said here, not by uvicorn once 'listening on' was printed.
    try:
        app.storage.open()
    except (OSError, sqlite3.Error) as e:
        where = getattr(e, "filename", None)
        if isinstance(e, FileExistsError):  # a file where a directory of the path should be
            reason = f"{where!r} is a file, not a directory"
        elif isinstance(e, OSError):
            reason = f"{e.strerror or e}" + (f" ({where})" if where and where != cfg.db else "")
        else:
            reason = str(e)
        _err(f"{cfg.setting('db')} {cfg.db!r}: cannot open or create the database: {reason}")
        app.close()
        return 2
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket's proto is IPPROTO_TCP; without it (no uvloop) every response waits
    # ~40 ms (Nagle + delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as e:
        _err(f"Cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}")
        sock.close()
        app.close()
        return 2
    sock.set_inheritable(True)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        loop="auto",  # uvloop when installed
        http="auto",  # httptools when installed
        lifespan="on",
        access_log=False,
        log_level=cfg.log_level,
        server_header=False,
        proxy_headers=False,  # the gateway never reads the client address or the scheme
        timeout_graceful_shutdown=int(max(1, cfg.graceful_timeout_seconds)),
        backlog=2048,
    )
    server = GatewayServer(config, sock)
    shown = f"[{cfg.host}]" if family == socket.AF_INET6 else cfg.host
    print(
        f"Lunar gateway listening on http://{shown}:{port} (db {cfg.db}; "
        f"{len(app.catalog.models)} models)",
        flush=True,
    )
    tune_gc()
    try:
        server.run()
    finally:
        app.close()  # flushes the ledger when the lifespan shutdown could not run
        sock.close()
    return 0 if server.started else 1


# ---------------------------------------------------------------------------------------------
# keys and usage: over HTTP, or on the database file


class _Target:
    def __init__(self, args: argparse.Namespace) -> None:
        # '~' as a shell would (`--db=~/lunar.db` reaches no shell's expansion).
        self.db: str | None = None if args.db is None else os.path.expanduser(args.db)
        self.url = "" if self.db is not None else gateway_url(args.url)
        self.args = args

    def http(self, method: str, path: str, **kw: Any) -> Any:
        import httpx

        master, variable = master_key()
        if not master:
            raise _Fail(
                "LUNAR_MASTER_KEY is not set (the admin API needs the gateway's master key; "
                "LUNAR_API_KEY, the SDK's variable, is read too), or use --db"
            )
        try:
            r = httpx.request(
                method,
                self.url + path,
                headers={"authorization": f"Bearer {master}"},
                timeout=30.0,
                **kw,
            )
        except httpx.HTTPError as e:
            raise _Fail(
                f"Cannot reach the gateway at {self.url}: {e} (start it with "
                "`lunar serve`, pass --url, or use --db)"
            ) from None
        try:
            data = r.json()
        except ValueError:
            data = None
        if r.status_code >= 400:
            message = (
                (data or {}).get("error", {}).get("message") if isinstance(data, dict) else None
            )
            hint = ""
            if r.status_code == 401 and variable != "LUNAR_MASTER_KEY":
                hint = (
                    f" ({variable} was sent: the admin API takes only the master key; set "
                    "LUNAR_MASTER_KEY to it)"
                )
            raise _Fail(f"[{r.status_code}] {message or r.text[:300]}{hint}")
        return data

    def storage(self) -> Any:
        """The database of ``--db``, open. It must exist: these commands work on a
        gateway's database (``lunar serve`` creates it), and opening a mistyped path would
        create an empty one, directories and all, and show it as empty."""
        from .storage import SQLiteStorage, not_a_gateway_database, unreadable_database

        assert self.db is not None
        try:
            storage = SQLiteStorage(self.db, recover=False)  # the gateway recovers its spill
        except ValueError as e:  # e.g. ':memory:', which would be an empty database
            raise _Fail(f"--db {self.db!r}: {e}") from None
        if not os.path.exists(self.db):
            raise _Fail(
                f"--db {self.db!r}: no such file. Give the database of a gateway "
                "(`lunar serve --db FILE` creates it), or check the path."
            )
        problem = unreadable_database(self.db) or not_a_gateway_database(self.db)
        if problem:
            raise _Fail(f"--db {self.db!r}: {problem} (give the database of a gateway)")
        storage.open()
        return storage


class _Fail(Exception):
    pass


def master_key(environ: Any = os.environ) -> tuple[str | None, str]:
    """The key the admin API is sent, and the variable it came from: ``$LUNAR_MASTER_KEY``,
    else ``$LUNAR_API_KEY`` (the SDK's, which an operator may have set to the master key)."""
    for variable in ("LUNAR_MASTER_KEY", "LUNAR_API_KEY"):
        value = environ.get(variable, "").strip()
        if value:
            return value, variable
    return None, "LUNAR_MASTER_KEY"


def gateway_url(flag: str | None, environ: Any = os.environ) -> str:
    """The gateway's root URL, from ``--url``, else ``$LUNAR_GATEWAY_URL``, else
    ``$LUNAR_BASE_URL`` (the SDK's), else the default. The SDK's form (ending in ``/v1``) is
    taken from any of them: the admin API is at the root. One that is no URL is refused,
    naming where it came from."""
    url, setting = flag, "--url"
    for variable in ("LUNAR_GATEWAY_URL", "LUNAR_BASE_URL"):
        if url:
            break
        url, setting = environ.get(variable, "").strip(), f"${variable}"
    try:
        url = checked_base_url(url or DEFAULT_URL, setting).rstrip("/")
    except ValueError as e:
        raise _Fail(str(e)) from None
    return url.removesuffix("/v1")


def _run(fn: Any, args: argparse.Namespace) -> int:
    try:
        return int(fn(args))
    except _Fail as e:
        _err(str(e))
        return 1
    except ConfigError as e:
        _err(str(e))
        return 2
    except sqlite3.Error as e:  # a database of something else, or locked too long
        _err(f"--db {args.db!r}: {e}")
        return 1


def cmd_keys_create(args: argparse.Namespace) -> int:
    return _run(_keys_create, args)


def _keys_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name}
    for name in ("rpm", "tpm", "budget_usd"):
        value = getattr(args, name)
        if value is not None:
            body[name] = value
    if args.models:
        body["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    target = _Target(args)
    if target.db is None:
        out = target.http("POST", "/admin/keys", json=body)
    else:
        from .._errors import APIError
        from .keys import key_from_request

        try:
            key, rec = key_from_request(body, _config(args).build_catalog())
        except APIError as e:
            raise _Fail(e.message) from None
        storage = target.storage()
        try:
            storage.add_key(rec)
        finally:
            storage.close()
        out = rec.public(0.0)
        out["key"] = key
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(out["key"])
    limits = _limits_text(out)
    print(
        f"Key '{out['name']}' ({out['id']}) created{': ' + limits if limits else ''}. "
        "It is shown only this once: store it now.",
        file=sys.stderr,
    )
    return 0


def _limits_text(key: dict[str, Any], every: bool = False) -> str:
    """A key's limits in words; with ``every``, also the ones it does not have."""
    parts = []
    for name, label, unset in (
        ("rpm", "rpm", "none"),
        ("tpm", "tpm", "none"),
        ("budget_usd", "budget $", "none"),
        ("models", "models", "all"),
    ):
        if key.get(name) is not None:
            parts.append(f"{label} {key[name]}")
        elif every:
            parts.append(f"{label} {unset}")
    return ", ".join(parts)


def cmd_keys_list(args: argparse.Namespace) -> int:
    return _run(_keys_list, args)


def _keys_list(args: argparse.Namespace) -> int:
    target = _Target(args)
    if target.db is None:
        data = target.http("GET", "/admin/keys")["data"]
    else:
        storage = target.storage()
        try:
            spend = storage.spend_by_key()
            data = [
                r.public(spend.get(r.id, 0.0))
                for r in sorted(storage.load_keys(), key=lambda r: r.created_at)
            ]
        finally:
            storage.close()
    if args.json:
        print(json.dumps({"object": "list", "data": data}, indent=2))
        return 0
    rows = [
        (
            k["id"],
            k["name"],
            k["hint"],
            "-" if k["rpm"] is None else str(k["rpm"]),
            "-" if k["tpm"] is None else str(k["tpm"]),
            "-" if k["budget_usd"] is None else f"{k['budget_usd']:g}",
            f"{k.get('spent_usd') or 0:.6f}",
            "*" if k["models"] is None else ",".join(k["models"]) or "(none)",
            time.strftime("%Y-%m-%d", time.gmtime(k["created_at"])),
            "revoked" if k["revoked_at"] else "active",
        )
        for k in data
    ]
    _table(
        ("id", "name", "key", "rpm", "tpm", "budget $", "spent $", "models", "created", "status"),
        rows,
    )
    return 0


def _usd(text: str) -> float:
    """An amount of USD: a number, and a finite one (JSON has no NaN or infinity to send)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a number of USD, got {text!r}")
    return value


def _or_none(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """An option's type that also takes ``none`` (a limit lifted)."""

    def parse(text: str) -> Any:
        return None if text.strip().lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error
    return parse


def cmd_keys_update(args: argparse.Namespace) -> int:
    return _run(_keys_update, args)


def _keys_update(args: argparse.Namespace) -> int:
    from .storage import KEY_FIELDS

    body = {name: getattr(args, name) for name in KEY_FIELDS if hasattr(args, name)}
    target = _Target(args)
    if target.db is None:
        out = target.http("PATCH", f"/admin/keys/{args.key_id}", json=body)
    else:
        from .._errors import APIError
        from .keys import changes_from_request, update_key

        try:
            changes = changes_from_request(body, _config(args).build_catalog())
            storage = target.storage()
            try:
                rec = update_key(storage, args.key_id, changes)
                spent = storage.spend_by_key().get(args.key_id, 0.0)
            finally:
                storage.close()
        except APIError as e:
            raise _Fail(e.message) from None
        out = rec.public(spent)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"Key '{out['name']}' ({out['id']}) updated: {_limits_text(out, every=True)}.")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    return _run(_keys_revoke, args)


def _keys_revoke(args: argparse.Namespace) -> int:
    target = _Target(args)
    if target.db is None:
        out = target.http("DELETE", f"/admin/keys/{args.key_id}")
    else:
        storage = target.storage()
        try:
            rec = storage.revoke_key(args.key_id, time.time())
        finally:
            storage.close()
        if rec is None:
            raise _Fail(f"No key with id '{args.key_id}'")
        out = rec.public()
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"Key '{out['name']}' ({out['id']}) revoked.")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    return _run(_usage, args)


def _usage(args: argparse.Namespace) -> int:
    target = _Target(args)
    params = {"group_by": args.group_by, "limit": str(args.limit)}
    for name in ("key", "model", "since", "until"):
        value = getattr(args, name)
        if value:
            params[name] = value
    if target.db is None:
        out = target.http("GET", "/admin/usage", params=params)
    else:
        from urllib.parse import urlencode

        from .._errors import APIError
        from .app import usage_query

        try:
            query = usage_query(urlencode(params).encode())
        except APIError as e:
            raise _Fail(e.message) from None
        storage = target.storage()
        try:
            out = storage.usage(query)
        finally:
            storage.close()
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print_usage(out)
    return 0


def print_usage(out: dict[str, Any]) -> None:
    """The report as a table. Cache reads and writes (parts of the prompt tokens) get their
    columns when the report has any."""
    groups = out.get("group_by") or []
    totals = out["totals"]
    caches = bool(totals.get("cached_tokens") or totals.get("cache_write_tokens"))

    def tokens(r: dict[str, Any]) -> list[str]:
        cells = [str(r["prompt_tokens"]), str(r["completion_tokens"])]
        if caches:  # (a gateway older than the cache_write_tokens column: 0)
            cells += [str(r.get("cached_tokens", 0)), str(r.get("cache_write_tokens", 0))]
        return cells

    token_heads: tuple[str, ...] = ("prompt tok", "completion tok")
    if caches:
        token_heads += ("cache read tok", "cache write tok")
    if groups:
        heads = [("key" if g == "key" else g) for g in groups]
        headers = (*heads, "requests", "errors", *token_heads, "cost $")
        rows = []
        for item in out["data"]:
            cells = []
            for g in groups:
                if g == "key":
                    cells.append(item.get("key_name") or item.get("key_id") or "")
                else:
                    cells.append(str(item.get(g) if item.get(g) is not None else "-"))
            cells += [
                str(item["requests"]),
                str(item["errors"] + item["rejected"] + item["cancelled"]),
                *tokens(item),
                f"{item['total_cost_usd']:.6f}",
            ]
            rows.append(tuple(cells))
        rows.append(
            tuple(
                [
                    "total",
                    *([""] * (len(groups) - 1)),
                    str(totals["requests"]),
                    str(totals["errors"] + totals["rejected"] + totals["cancelled"]),
                    *tokens(totals),
                    f"{totals['total_cost_usd']:.6f}",
                ]
            )
        )
        _table(headers, rows)
    else:
        rows = [
            (
                time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["ts"])),
                r.get("key_name") or r["key_id"],
                r["model"] or "-",
                r["provider"] or "-",
                r["status"],
                *tokens(r),
                f"{r['total_cost_usd']:.6f}",
                "-" if r["latency_ms"] is None else f"{r['latency_ms']:.0f}",
            )
            for r in out["data"]
        ]
        _table(
            ("time (UTC)", "key", "model", "provider", "status", *token_heads, "cost $", "ms"),
            rows,
        )


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """rich on a terminal (when installed); aligned plain text otherwise (pipes, files)."""
    try:
        if not sys.stdout.isatty():
            raise ImportError
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
        for row in [headers, *rows]:
            print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
        return
    table = Table(*headers)
    for row in rows:
        table.add_row(*row)
    Console(highlight=False).print(table)


def main(argv: Sequence[str] | None = None) -> int:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="python -m lunar.server", description="The Lunar gateway's commands."
    )
    parser.add_argument("--version", action="version", version=f"lunar {__version__}")
    add_server_commands(parser.add_subparsers(dest="command", required=True))
    return dispatch(parser.parse_args(argv))


def dispatch(args: argparse.Namespace) -> int:
    """Run the command ``args`` names, as both ``lunar`` and ``python -m lunar.server`` do:
    Ctrl-C is exit code 130 without a traceback (``lunar serve`` has shut down gracefully by
    then), and a reader that left (``lunar usage | head``) is no error."""
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
