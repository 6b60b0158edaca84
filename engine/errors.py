"""The engine's one exception, and turning a dead engine's log into advice.

    Exception
     └── EngineError            the engine could not be started or kept running; `advice`
          │                     is one sentence saying what to do, `log_lines` its last words
          └── EngineRequestError  a tokenize or warm request to the running engine failed

Everything else (bugs, cancellation) propagates as the builtin exception it is.
"""

from __future__ import annotations

import re
from collections.abc import Sequence


class EngineError(Exception):
    """The engine could not start or stay up. `str()` is the advice, then the engine's log."""

    def __init__(
        self, advice: str, log_lines: Sequence[str] = (), *, port_in_use: int | None = None
    ) -> None:
        self.advice = advice
        self.log_lines = list(log_lines)
        self.port_in_use = port_in_use  # the port the engine could not bind, if that was all
        super().__init__(advice)

    def __str__(self) -> str:
        if not self.log_lines:
            return self.advice
        tail = "\n".join("  " + line for line in self.log_lines)
        return f"{self.advice}\nLast lines of the engine's log:\n{tail}"


_IN_USE = re.compile(r"[Aa]ddress already in use|Errno 98")
# The port a bind failed on, as ZeroMQ (the KV-event replay socket, the engine core's
# sockets) and asyncio (the HTTP server) name it.
_PORT_NAMED = re.compile(r"addr='\w+://[^']*:(\d+)'|address \('[^']*', (\d+)\)")

# (pattern in the engine's log, advice); the first pattern found decides.
_CAUSES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"No module named '?vllm"),
     "vLLM is not installed in the engine's Python; install it with `make engine`."),
    (re.compile(r"is not a local folder and is not a valid model identifier|Repository Not Found"
                r"|couldn't connect to 'https://huggingface.co'|LocalEntryNotFoundError"
                r"|does not appear to have a file named config.json|Invalid repository ID"),
     "The model could not be found or downloaded: name a local model folder, a model this "
     "machine can download, or build an offline one with `preheat tiny-model DIR`."),
    (re.compile(r"does not recognize this architecture|are not supported for now"
                r"|Model architectures? .* (is|are) not supported"),
     "vLLM cannot load this model's architecture: name a model that this vLLM supports."),
    (re.compile(r"max seq len .* is larger than the maximum number of tokens that can be stored"
                r"|larger than the maximum number of tokens that can be stored in KV cache"
                r"|KV cache is needed, which is larger than the available KV cache memory"),
     "The KV cache is too small for --max-model-len: give the engine more KV cache memory "
     "(--engine-arg=--kv-cache-memory-bytes=N) or lower the maximum model length "
     "(--engine-arg=--max-model-len=N{fits})."),
    (re.compile(r"[Oo]ut of memory|OutOfMemoryError|No available memory for the cache blocks"
                r"|Insufficient memory"),
     "The engine ran out of memory: lower its KV cache size or --max-model-len, or use a "
     "smaller model."),
]


def diagnose(
    log_lines: Sequence[str], returncode: int, port: int, tail: Sequence[str]
) -> EngineError:
    """The EngineError for an engine that exited during start-up, from what its log says."""
    text = "\n".join(log_lines)
    if _IN_USE.search(text):
        named = _PORT_NAMED.findall(text)
        taken = int(next(p for p in named[-1] if p)) if named else port
        if taken == port:
            advice = (f"Port {port} is already in use: stop what is using it or choose "
                      "another engine port.")
        else:
            advice = (f"Port {taken}, which the engine binds for its own use, was taken "
                      "before it could bind it: start again (preheat chooses other ports).")
        return EngineError(advice, tail, port_in_use=taken)
    fits = _FITS.search(text)
    for pattern, advice in _CAUSES:
        if pattern.search(text):
            return EngineError(advice.format(
                port=port, fits=f"; this cache holds {fits.group(1)}" if fits else ""), tail)
    how = (f"was killed by signal {-returncode}" if returncode < 0
           else f"exited with code {returncode}")
    # The root cause, not the wrapper the API server raises after its engine core died.
    errors = [line.strip() for line in log_lines
              if _ERROR_LINE.search(line) and not _WRAPPER.search(line)]
    said = f" ({errors[-1][:200]})" if errors else ""
    return EngineError(
        f"The engine {how} during start-up{said}: fix the cause shown in its log below and "
        "start again.",
        tail,
    )


_ERROR_LINE = re.compile(r"^\s*[\w.]*(Error|Exception)\b.*:")
_WRAPPER = re.compile(r"Engine core initialization failed|See root cause above")
_FITS = re.compile(r"estimated maximum model length is (\d+)")


class EngineRequestError(EngineError):
    """A request to a running engine failed: it could not be reached or answered an error.
    `status` is the HTTP status when it answered (None when it could not be reached)."""

    def __init__(self, advice: str, status: int | None = None) -> None:
        super().__init__(advice)
        self.status = status
