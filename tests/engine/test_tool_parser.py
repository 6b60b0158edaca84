"""The tool-call parser preheat starts its engine with: read from the model's chat template,
guessed from a hub id's name, `hermes` for the demo model, and never over the user's own."""

from __future__ import annotations

import json

import pytest

from engine import tool_parser
from engine.supervisor import Engine


@pytest.fixture(autouse=True)
def _empty_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))


def _model(tmp_path, name: str, template: str, as_file: bool = False):
    folder = tmp_path / name
    folder.mkdir(parents=True)
    if as_file:
        (folder / "chat_template.jinja").write_text(template)
        (folder / "tokenizer_config.json").write_text("{}")
    else:
        (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return folder


@pytest.mark.parametrize("template, as_file, parser", [
    ("{% for t in tools %}<tool_call>{{ t | tojson }}</tool_call>{% endfor %}", False, "hermes"),
    ("<tool_call>\n<function={{ name }}>", False, "qwen3_coder"),
    ("{{- '<|python_tag|>' + tool_call.name }}", True, "llama3_json"),
    ("[TOOL_CALLS] [{{ calls }}]", False, "mistral"),
    ("{% for m in messages %}{{ m.content }}{% endfor %}", False, None),  # writes no tool calls
])
def test_the_parser_is_the_one_the_chat_template_writes(tmp_path, template, as_file, parser):
    assert tool_parser.parser_for(str(_model(tmp_path, "m", template, as_file))) == parser


def test_a_downloaded_hub_model_is_read_from_the_cache_and_others_guessed_by_name(tmp_path):
    snapshot = tmp_path / "hub" / "models--acme--Assistant-7B" / "snapshots" / "abc123"
    _model(snapshot.parent, snapshot.name, "[TOOL_CALLS]")
    assert tool_parser.parser_for("acme/Assistant-7B") == "mistral"
    assert tool_parser.parser_for("Qwen/Qwen2.5-0.5B-Instruct") == "hermes"
    assert tool_parser.parser_for("meta-llama/Llama-3.1-8B-Instruct") == "llama3_json"
    assert tool_parser.parser_for("acme/unknown-model") is None


def test_engine_flags(tmp_path, caplog):
    qwen = str(_model(tmp_path, "qwen", "<tool_call>"))
    assert tool_parser.engine_flags(qwen, ()) == [
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    # The user's own choice wins, in either spelling.
    assert tool_parser.engine_flags(qwen, ("--tool-call-parser=mistral",)) == []
    assert tool_parser.engine_flags(qwen, ("--enable-auto-tool-choice",)) == []
    plain = str(_model(tmp_path, "plain", "{{ messages }}"))
    assert tool_parser.engine_flags(plain, (), demo_model=True)[-1] == "hermes"
    assert tool_parser.engine_flags(plain, ()) == []
    assert "--tool-call-parser=NAME" in caplog.text  # says how to set one


def test_the_demo_model_engine_accepts_tools(tiny_model):
    argv = Engine(str(tiny_model)).command()
    assert argv[argv.index("--tool-call-parser") + 1] == "hermes"
    assert "--enable-auto-tool-choice" in argv
    argv = Engine(str(tiny_model), engine_args=["--tool-call-parser", "llama3_json"]).command()
    assert argv.count("--tool-call-parser") == 1
