"""`preheat templates`, `preheat workflows`, `preheat learn`: what learn/ knows, from the store.

    preheat learn                  # rebuild everything from the captured exchanges, save it
    preheat templates [--json]     # the learned call templates (and message templates)
    preheat workflows [--json]     # one DAG per workflow type, as text or JSON

`templates` and `workflows` read the newest saved snapshot (storage/learned.py); `learn`
replays every stored exchange, in arrival order, through a fresh `Learner` and saves what it
learned. All three take `--db` (default: PREHEAT_DB, else sqlite:///preheat.db).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from proxy.cli import DB_HELP, CliError


def register(sub) -> None:
    """Add the learning commands to the `preheat` sub-command parsers."""
    t = sub.add_parser("templates", help="list learned call and message templates",
                       description="The call templates learned from captured traffic: "
                                   "tools, leading messages with {slots}, and the newest turn.")
    t.add_argument("--json", action="store_true", help="print JSON")
    t.add_argument("--db", help=DB_HELP)
    t.add_argument("--all", action="store_true", help="include templates seen only once")
    t.set_defaults(func=cmd_templates)

    w = sub.add_parser("workflows", help="list learned workflow DAGs",
                       description="One DAG per workflow type: call templates, and the edges "
                                   "between them with probability, fan-out and gap.")
    w.add_argument("--json", action="store_true", help="print JSON")
    w.add_argument("--db", help=DB_HELP)
    w.set_defaults(func=cmd_workflows)

    learn = sub.add_parser("learn", help="rebuild what is learned from the captured exchanges",
                           description="Replay every captured exchange through a fresh learner "
                                       "and save its templates and workflows in the store.")
    learn.add_argument("--db", help=DB_HELP)
    learn.set_defaults(func=cmd_learn)


def cmd_templates(args: argparse.Namespace) -> int:
    learner = _saved(args)
    calls = learner.templates(1 if args.all else None) if learner else []
    messages = learner.message_templates() if learner else []
    if args.json:
        print(json.dumps({"templates": [asdict(t) for t in calls],
                          "messages": [{**asdict(m), "text": m.text} for m in messages]}, indent=2))
        return 0
    if not calls:
        print("no templates learned yet" + ("" if learner else " (run `preheat learn`)"))
        return 0
    for t in calls:
        print(f"{t.id}  calls={t.calls} sessions={t.sessions} static prefix={t.prefix_tokens} ids")
        for line in t.text.split("\n"):
            print(f"    {line}")
        print()
    print(f"{len(calls)} call templates, {len(messages)} message templates")
    return 0


def cmd_workflows(args: argparse.Namespace) -> int:
    learner = _saved(args)
    found = learner.workflows() if learner else []
    if args.json:
        print(json.dumps([asdict(w) for w in found], indent=2))
        return 0
    if not found:
        print("no workflows learned yet" + ("" if learner else " (run `preheat learn`)"))
        return 0
    for w in found:
        print(w.text(learner.describe))
        print()
    return 0


def cmd_learn(args: argparse.Namespace) -> int:
    from learn.learner import Learner
    from proxy.learning import IMPORTED_KEY, UNTIL_KEY
    from storage.learned import save_learned

    store = _store(args)
    if (mark := store.serving()) and mark.get("learning"):
        raise CliError(
            f"a preheat serve is learning from this store (its writer is pid {mark.get('pid')} "
            f"on {mark.get('host')}) and saves what it learned over this every minute; it "
            "learns imported calls itself. To learn afresh, stop it, run this, start it again.")
    learner = Learner()
    imported = store.imported()  # before reading: an import stored later is learned later
    until = seen = 0
    for ex in store.exchanges():
        learner.observe(ex)
        until = max(until, ex.started_at)
        seen += 1
        if seen % 10_000 == 0:
            print(f"... {seen} exchanges", file=sys.stderr)
    snapshot = learner.snapshot()
    snapshot[UNTIL_KEY], snapshot[IMPORTED_KEY] = until, imported  # a server goes on from here
    snapshot_id = save_learned(store, snapshot)
    skipped = sum(learner.skipped.values())
    print(f"learned from {learner.observed} of {seen} exchanges ({skipped} skipped"
          + (f": {', '.join(f'{k} {v}' for k, v in sorted(learner.skipped.items()))}" if skipped else "")
          + f"); {len(learner.templates())} call templates, {len(learner.message_templates())} "
          f"message templates, {len(learner.workflows())} workflows; saved as snapshot {snapshot_id}")
    return 0


def _store(args: argparse.Namespace):
    from proxy.cli import open_store

    return open_store(args)


def _saved(args: argparse.Namespace):
    """The learner saved in the store, or None when nothing was learned yet."""
    from learn.learner import Learner
    from proxy.cli import CliError
    from storage.learned import load_learned

    data = load_learned(_store(args))
    if data is None:
        return None
    try:
        return Learner.restore(data)
    except ValueError as exc:
        raise CliError(f"the saved learned state cannot be read: {exc}") from None
