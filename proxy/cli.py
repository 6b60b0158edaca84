"""The `preheat` command: serve the proxy, and read what it captured."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from proxy.config import Settings, options

DB_HELP = "capture store URL or SQLite file (default: PREHEAT_DB, else sqlite:///preheat.db)"

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        code = args.func(args) or 0
        sys.stdout.flush()  # here, so a closed pipe is caught below and not at exit
        return code
    except BrokenPipeError:
        # The reader went away (`preheat sessions | head`): stop quietly, as Python's docs on
        # SIGPIPE advise; stdout goes to devnull so the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130
    except CliError as exc:
        print(f"preheat: {exc}", file=sys.stderr)
        return 2


OPTIMISATIONS = ("admission", "admission_suspend", "admission_guests", "admission_evict_done", "admission_handoff", "admission_priority", "ordering", "prompt_cache", "prewarm", "prewarm_static")
OPT_IN = ("admission_bound_guests",)
"""Switches off by default: each has a flag that switches it on."""


class CliError(Exception):
    """A problem the user can fix; printed as one line, without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preheat",
        description="A transparent caching proxy for LLM agents.",
    )
    sub = parser.add_subparsers(metavar="COMMAND")

    serve = sub.add_parser(
        "serve", help="run the proxy",
        epilog="Environment: " + ", ".join(name for name, _, _ in options()),
    )
    serve.add_argument("--upstream", help="OpenAI-compatible server to forward to")
    serve.add_argument("--model", help="model for the embedded vLLM engine")
    serve.add_argument(
        "--engine-arg", action="append", dest="engine_args", metavar="ARG",
        help="extra vLLM flag (repeatable), e.g. --engine-arg=--max-model-len=4096",
    )
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve.add_argument("--db", help="capture store URL or SQLite file (default sqlite:///preheat.db)")
    serve.add_argument("--no-capture", dest="capture", action="store_false", default=None,
                       help="forward only: store nothing, learn nothing (PREHEAT_CAPTURE=0)")
    serve.add_argument("--admin-token", help="token for the admin page (default: generated, logged)")
    for name in OPTIMISATIONS:  # each optimisation has its switch, to compare them in one run
        serve.add_argument(f"--no-{name.replace('_', '-')}", dest=name, action="store_false",
                           default=None, help=f"switch off (PREHEAT_{name.upper()}=0)")
    for name in OPT_IN:
        serve.add_argument(f"--{name.replace('_', '-')}", dest=name, action="store_true",
                           default=None, help=f"switch on (PREHEAT_{name.upper()}=1)")
    serve.set_defaults(func=cmd_serve)

    sessions = sub.add_parser("sessions", help="list captured sessions")
    sessions.add_argument("--db", help=DB_HELP)
    sessions.add_argument("--json", action="store_true", help="print JSON")
    sessions.add_argument("--limit", type=int, default=100,
                          help="the latest this many sessions (default %(default)s)")
    sessions.set_defaults(func=cmd_sessions)

    show = sub.add_parser("show", help="show one exchange or session")
    show.add_argument("id", help="a session or exchange id")
    show.add_argument("--db", help=DB_HELP)
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=cmd_show)

    tiny = sub.add_parser("tiny-model", help="build an offline random-weight model")
    tiny.add_argument("dir", help="folder to write the model into")
    tiny.add_argument("--hidden", type=int, default=256, help="hidden size (default %(default)s)")
    tiny.add_argument("--layers", type=int, default=4, help="layers (default %(default)s)")
    tiny.set_defaults(func=cmd_tiny_model)

    for module in ("proxy.cli_learn", "proxy.cli_replay"):
        try:
            register = __import__(module, fromlist=["register"]).register
        except ImportError:
            continue
        register(sub)
    return parser


def _settings(args: argparse.Namespace, **flags) -> Settings:
    try:
        return Settings.from_env(db=getattr(args, "db", None), **flags)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(
        args,
        upstream=args.upstream,
        model=args.model,
        engine_args=tuple(args.engine_args) if args.engine_args else None,
        host=args.host,
        port=args.port,
        capture=args.capture,
        admin_token=args.admin_token,
        **{name: getattr(args, name) for name in OPTIMISATIONS + OPT_IN},
    )
    if settings.upstream and settings.model:
        raise CliError("give either --upstream (an existing server) or --model (run vLLM), not both")
    if settings.log_level.upper() not in logging.getLevelNamesMapping():
        raise CliError(f"PREHEAT_LOG_LEVEL={settings.log_level!r} is not a valid level "
                       "(DEBUG, INFO, WARNING, ERROR or CRITICAL)")
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health probe otherwise
    from engine.errors import EngineError
    from proxy.server import run
    from storage.store import StoreError

    try:
        run(settings)
    except (EngineError, StoreError) as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}")
    return 0


def open_store(args: argparse.Namespace, create: bool = False):
    """The store named by `--db` (or PREHEAT_DB), or a one-line error for the user.

    Only a command that writes calls (`import`) passes `create`: opening a store creates it,
    and a reader run from the wrong folder would otherwise make an empty `preheat.db` there
    and report that nothing was captured.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from storage.store import Store, StoreError, store_url

    url = store_url(_settings(args).db)
    if not create:
        try:
            parsed = make_url(url)
        except ArgumentError as exc:
            raise CliError(f"cannot open the store at {url}: {exc}") from None
        path = parsed.database if parsed.get_backend_name() == "sqlite" else None
        if path and path != ":memory:" and not path.startswith("file:") and not Path(path).exists():
            raise CliError(f"no capture store at {Path(path).absolute()}: pass --db (or set "
                           "PREHEAT_DB), or run this where `preheat serve` ran")
    try:
        return Store(url)
    except StoreError as exc:
        raise CliError(str(exc)) from None


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def cmd_sessions(args: argparse.Namespace) -> int:
    store = open_store(args)
    found = store.sessions(limit=args.limit)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    if not found:
        print("no sessions captured yet")
        return 0
    print(f"{'session':<40} {'source':<24} {'calls':>5}  {'first':<19}  {'last':<19}")
    for s in found:
        print(f"{s['id'][:40]:<40} {s['source'][:24]:<24} {len(s['exchanges']):>5}  "
              f"{_when(s['first_at'])}  {_when(s['last_at'])}")
    return 0


def exchange_summary(ex) -> dict:
    """An exchange as plain JSON (the CLI's and admin page's shared view)."""
    return {
        "id": ex.id,
        "method": ex.method,
        "path": ex.path,
        "status": ex.status,
        "started_at": ex.started_at,
        "session_id": ex.session_id,
        "session_source": ex.session_source,
        "parent_id": ex.parent_id,
        "tenant": ex.tenant,
        "model": ex.model,
        "stream": ex.stream,
        "timings": {
            "upstream_sent": ex.t_upstream_sent,
            "upstream_headers": ex.t_upstream_headers,
            "first_token": ex.t_first_token,
            "done": ex.t_done,
        },
        "request": ex.request_json,
        "request_error": ex.request_error,
        "answer": ex.answer,
        "usage": ex.usage,
        "events": ex.events,
        "error": ex.error,
        "error_body": error_body(ex),
    }


ERROR_BODY_CHARS = 2_000


def error_body(ex) -> str | None:
    """What the upstream answered a failed call (status >= 400) with, cut to ERROR_BODY_CHARS."""
    if ex.status is None or ex.status < 400:
        return None
    if ex.response_json is not None:
        text = json.dumps(ex.response_json, ensure_ascii=False)
    elif ex.response_chunks:
        text = ex.response_body.decode("utf-8", errors="replace")
    elif ex.events:
        text = "\n".join(str(e.get("data")) for e in ex.events)
    else:
        return None
    return text if len(text) <= ERROR_BODY_CHARS else text[:ERROR_BODY_CHARS] + "…"


def cmd_show(args: argparse.Namespace) -> int:
    store = open_store(args)
    ex = store.exchange(args.id)
    if ex is not None:
        data = exchange_summary(ex)
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            _print_exchange(data)
        return 0
    session = store.session(args.id)
    if session is None:
        raise CliError(f"no exchange or session with id {args.id!r}")
    if args.json:
        session["calls"] = [exchange_summary(e) for e in store.exchanges(session_id=args.id)]
        print(json.dumps(session, indent=2))
        return 0
    print(f"session {session['id']} ({session['source']}), {len(session['exchanges'])} calls")
    for e in store.exchanges(session_id=args.id):
        msgs = e.messages
        print(f"  {e.id}  {_when(e.started_at)}  {e.path}  {e.status}  "
              f"{len(msgs)} messages  {(e.t_done or 0) * 1000:.0f} ms")
    return 0


def _print_exchange(d: dict) -> None:
    print(f"exchange {d['id']}: {d['method']} {d['path']} -> {d['status']}")
    print(f"  session {d['session_id']} ({d['session_source']}), model {d['model']}")
    t = d["timings"]
    if t["done"] is not None:
        ft = t["first_token"]
        print(f"  done in {t['done'] * 1000:.1f} ms" +
              (f", first token at {ft * 1000:.1f} ms" if ft is not None else ""))
    if d["request_error"]:
        print(f"  request not parsed: {d['request_error']}")
    request = d["request"] if isinstance(d["request"], dict) else {}
    prompt = request.get("messages") or request.get("input") or []
    if isinstance(prompt, str):  # a Responses API `input` may be plain text
        prompt = [{"role": "input", "content": prompt}]
    if not prompt and isinstance(request.get("prompt"), str):
        prompt = [{"role": "prompt", "content": request["prompt"]}]
    for m in prompt if isinstance(prompt, list) else []:
        if isinstance(m, dict):
            role = m.get("role") or m.get("type") or "?"
            content = m.get("content", m.get("output", m.get("arguments")))
        else:
            role, content = "?", m
        print(f"  [{role}] {str(content)[:200]}")
    if d["answer"]:
        print(f"  [answer] {str(d['answer'].get('content'))[:200]}")
        for call in d["answer"].get("tool_calls") or []:
            fn = call.get("function") or {}
            print(f"  [tool call] {fn.get('name')}({str(fn.get('arguments'))[:150]})")
    if d["usage"]:
        print(f"  usage {json.dumps(d['usage'])}")
    if d["error"]:
        print(f"  error: {d['error']}")
    if d["error_body"]:
        print(f"  response: {d['error_body']}")


def cmd_tiny_model(args: argparse.Namespace) -> int:
    try:
        from engine.model import build_tiny_model
    except ImportError as exc:
        raise CliError(f"the engine extra is not installed ({exc}); run `make engine`") from None
    path = build_tiny_model(args.dir, hidden=args.hidden, layers=args.layers)
    print(f"built a random-weight model in {path}")
    return 0


if __name__ == "__main__":
    # `python -m proxy.cli`: run the imported module's main, so that this file is not loaded
    # twice and the `CliError` the sub-command modules raise is the one main() catches.
    from proxy.cli import main as imported_main

    sys.exit(imported_main())
