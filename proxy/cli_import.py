"""`preheat import FILE`: load an external trace into the capture store.

    preheat import ../shared/workloads/tau-bench-airline/gpt-4o-airline.json
    preheat import requests.jsonl --db sqlite:///other.db

Formats (proxy/importer.py): OpenAI-format trajectories (a JSON list of runs with `traj`),
SWE-agent `.traj` files, and JSONL of raw requests (optionally with responses). Imported
calls go through the same `Store.write` as captured ones and look the same afterwards.
"""

from __future__ import annotations

import argparse

from proxy.cli import CliError, open_store


def register(sub) -> None:
    p = sub.add_parser("import", help="load an external trace into the capture store",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("file")
    p.add_argument("--db", help="capture store URL (default: PREHEAT_DB)")
    p.add_argument("--tools", help="tool schemas (default: tools.json beside the file, if any)")
    p.add_argument("--model", help="model name to record (trajectory files name none)")
    p.add_argument("--limit", type=int, help="import at most this many sessions")
    p.set_defaults(func=cmd_import)


def cmd_import(args: argparse.Namespace) -> int:
    from proxy.importer import TraceError, import_trace, read_trace

    try:
        trace = read_trace(args.file, tools=args.tools, model=args.model, limit=args.limit)
    except TraceError as exc:
        raise CliError(str(exc)) from None
    store = open_store(args, create=True)
    try:
        result = import_trace(trace, store)
    finally:
        store.close()
    print(f"imported {result.exchanges:,} calls in {result.sessions:,} sessions from "
          f"{args.file} ({trace.format}) into {store.url}; {result.present:,} were already "
          "in the store")
    return 0
