"""Which tool-call parser the embedded vLLM engine runs with.

Agents send tools with nearly every call, and vLLM refuses a request with tools (400: '"auto"
tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set') unless it
was started with a parser for the model's tool-call format. preheat starts its engine with
the parser its model's chat template writes, so agents work unchanged; a user's own
`--tool-call-parser` (or `--enable-auto-tool-choice`) engine argument wins.

The format is read from the chat template (the model folder's `tokenizer_config.json` or
`chat_template.jinja`, or for a hub id the copy in the Hugging Face cache), else guessed from
the model's name. preheat's random-weight demo model is given `hermes`: its template writes no
tools and its noise never holds a tool call, but requests with tools are accepted.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("preheat.engine")

# Marks in a chat template of the tool-call format it writes, most specific first.
TEMPLATE_MARKS: tuple[tuple[str, str], ...] = (
    ("<function=", "qwen3_coder"),          # Qwen3-Coder: <tool_call><function=name>
    ("<tool_call>", "hermes"),              # Qwen2.5, Qwen3, Hermes and ChatML fine-tunes
    ("<|python_start|>", "llama4_pythonic"),
    ("<|python_tag|>", "llama3_json"),      # Llama 3.1-3.3
    ("[TOOL_CALLS]", "mistral"),
    ("<|tool_call|>", "granite"),
    ("<｜tool▁calls▁begin｜>", "deepseek_v3"),
    ("<|channel|>", "openai"),              # gpt-oss
)
# Guesses from a hub id's name where no template is at hand (lowercase substrings).
NAME_MARKS: tuple[tuple[str, str], ...] = (
    ("qwen3-coder", "qwen3_coder"),
    ("qwen", "hermes"),
    ("hermes", "hermes"),
    ("llama-4", "llama4_pythonic"),
    ("llama-3", "llama3_json"),
    ("mistral", "mistral"),
    ("mixtral", "mistral"),
    ("granite", "granite"),
    ("gpt-oss", "openai"),
)
USER_FLAGS = ("--tool-call-parser", "--enable-auto-tool-choice", "--tool-parser-plugin")


def engine_flags(model: str, engine_args: tuple[str, ...] | list[str],
                 demo_model: bool = False) -> list[str]:
    """The flags that let the engine answer requests with tools (none if the user set them,
    or when the model's format is unknown: then it says how to set them)."""
    if any(a.startswith(USER_FLAGS) for a in engine_args):
        return []
    parser = "hermes" if demo_model else parser_for(model)
    if parser is None:
        log.warning(
            "no tool-call parser is known for model %s: the engine will refuse requests with "
            "tools; name one with --engine-arg=--enable-auto-tool-choice "
            "--engine-arg=--tool-call-parser=NAME (see vLLM's tool calling docs)", model)
        return []
    return ["--enable-auto-tool-choice", "--tool-call-parser", parser]


def parser_for(model: str) -> str | None:
    """The vLLM tool-call parser for `model` (a folder or a hub id), or None if unknown."""
    template = chat_template(model)
    if template:
        for mark, parser in TEMPLATE_MARKS:
            if mark in template:
                return parser
        return None  # a template that writes no tool calls: no parser reads them
    name = model.lower()
    for mark, parser in NAME_MARKS:
        if mark in name:
            return parser
    return None


def chat_template(model: str) -> str | None:
    """The text of a model's chat template(s), from its folder or the Hugging Face cache."""
    folder = _folder(model)
    if folder is None:
        return None
    texts = []
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        texts.append(jinja.read_text(errors="replace"))
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text(errors="replace")).get("chat_template")
        except (ValueError, AttributeError):
            template = None
        if isinstance(template, str):
            texts.append(template)
        elif isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            texts += [t.get("template", "") for t in template if isinstance(t, dict)]
    return "\n".join(t for t in texts if isinstance(t, str)) or None


def _folder(model: str) -> Path | None:
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if model.count("/") != 1:
        return None
    # A hub id: its snapshot in the Hugging Face cache, where it was downloaded before.
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(
        os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub")
    snapshots = sorted((hub / ("models--" + model.replace("/", "--")) / "snapshots").glob("*"),
                       key=lambda p: p.stat().st_mtime)
    return snapshots[-1] if snapshots else None
