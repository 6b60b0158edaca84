"""`preheat replay`: replay captured sessions or a trace file against one or two targets.

    preheat replay --target http://127.0.0.1:8000                 # every captured session
    preheat replay --session S1 --session S2 --target URL --speed 2
    preheat replay --workflow W --compare http://vllm:8000 http://preheat:8080
    preheat replay --trace ../shared/workloads/tau-bench-airline/gpt-4o-airline.json \\
                   --limit 20 --model Qwen/Qwen2.5-0.5B-Instruct --target URL

Also registers `preheat import` (proxy/cli_import.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from pathlib import Path

from proxy.cli import CliError, open_store

SHOWN_ERRORS = 3
"""Distinct errors printed per target; report.json has every call's."""


def register(sub) -> None:
    p = sub.add_parser("replay", help="replay captured sessions or a trace against a server",
                       description=__doc__.split("\n\n")[0])
    what = p.add_argument_group("what to replay (default: every captured session)")
    what.add_argument("--db", help="capture store URL (default: PREHEAT_DB)")
    what.add_argument("--session", action="append", default=[], metavar="ID",
                      help="a session id (repeatable)")
    what.add_argument("--workflow", metavar="ID", help="every session of a learned workflow")
    what.add_argument("--trace", metavar="FILE", help="a trace file instead of the store "
                      "(any format `preheat import` reads)")
    what.add_argument("--limit", type=int, help="replay at most this many sessions")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", metavar="URL", help="base URL to replay against")
    where.add_argument("--compare", nargs=2, metavar=("URL_A", "URL_B"),
                       help="replay against two targets, one after the other, side by side")
    how = p.add_argument_group("how")
    how.add_argument("--speed", type=float, default=1.0,
                     help="divide recorded gaps and start offsets by this (default 1)")
    how.add_argument("--stagger", type=float, default=0.0,
                     help="seconds between session starts when the trace has no timings")
    how.add_argument("--max-sessions", type=int, help="at most this many sessions at once")
    how.add_argument("--model", help="send this model name instead of the recorded one")
    how.add_argument("--no-force-length", dest="force_length", action="store_false",
                     help="do not force each output to its recorded length")
    how.add_argument("--api-key", help="sent as Authorization: Bearer")
    how.add_argument("--out", default="replay-report", help="report folder (default %(default)s)")
    p.set_defaults(func=cmd_replay)

    from proxy.cli_import import register as register_import

    register_import(sub)


def _exchanges(args: argparse.Namespace) -> tuple[list, str]:
    if args.trace:
        from proxy.importer import TraceError, read_trace

        try:
            return read_trace(args.trace).exchanges, args.trace
        except TraceError as exc:
            raise CliError(str(exc)) from None

    store = open_store(args)
    try:
        if args.workflow:
            from proxy.replay import sessions_of_workflow

            ids = sessions_of_workflow(store, args.workflow)
            if not ids:
                raise CliError(f"no captured session belongs to workflow {args.workflow!r}")
        else:
            ids = args.session
        if ids:
            found = []
            for sid in ids:
                calls = list(store.exchanges(session_id=sid))
                if not calls:
                    raise CliError(f"no captured session {sid!r}")
                found += calls
            return found, f"{len(ids)} selected sessions"
        return list(store.exchanges()), store.url
    finally:
        store.close()


def cmd_replay(args: argparse.Namespace) -> int:
    from proxy.importer import PLACEHOLDER_MODEL
    from proxy.replay import Progress, plan, run
    from proxy.replay_report import write_report

    if args.speed <= 0:
        raise CliError("--speed must be positive")
    exchanges, source = _exchanges(args)
    sessions = plan(exchanges, model=args.model, force_length=args.force_length,
                    stagger=args.stagger)
    if args.limit:
        sessions = sessions[: args.limit]
    if not sessions:
        raise CliError("nothing to replay: no successful chat, completions or responses calls")
    if not args.model and any(c.body.get("model") == PLACEHOLDER_MODEL
                              for s in sessions for c in s.calls):
        raise CliError(f"these calls were imported from a file that names no model (they "
                       f"record {PLACEHOLDER_MODEL!r}): pass --model, a model the target serves")
    n_calls = sum(len(s.calls) for s in sessions)
    targets = {"A": args.compare[0], "B": args.compare[1]} if args.compare else \
        {"target": args.target}
    runs = {}
    for label, url in targets.items():
        progress = Progress(n_calls, f"{label} {url}")
        runs[label] = asyncio.run(run(sessions, url, speed=args.speed,
                                      max_sessions=args.max_sessions, api_key=args.api_key,
                                      progress=progress))
    meta = {"source": source, "sessions": len(sessions), "calls": n_calls, "speed": args.speed,
            "force_length": args.force_length, "targets": targets}
    report, note = write_report(runs, Path(args.out), meta)
    if note:
        print(f"preheat: {note}", file=sys.stderr)
    errors = sum(c.error is not None for r in runs.values() for c in r.calls)
    for label, result in runs.items():
        failed = Counter(c.error for c in result.calls if c.error is not None)  # first seen first
        for error, n in list(failed.items())[:SHOWN_ERRORS]:
            print(f"preheat: {label} {result.target}: {n} of {len(result.calls)} calls failed: "
                  f"{error}", file=sys.stderr)
        if len(failed) > SHOWN_ERRORS:
            print(f"preheat: {label}: and {len(failed) - SHOWN_ERRORS} other kinds of error, "
                  f"in {report.parent / 'report.json'}", file=sys.stderr)
    print(f"replayed {len(sessions)} sessions, {n_calls} calls per target "
          f"({errors} errors); report: {report}")
    every_call_failed = any(r.calls and all(c.error is not None for c in r.calls)
                            for r in runs.values())
    return 1 if every_call_failed else 0
