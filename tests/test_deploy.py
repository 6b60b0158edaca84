"""The deploy/ files parse, and say what preheat needs: both containers, the engine flags
the supervisor uses, the proxy command, a volume for the database."""

from __future__ import annotations

import configparser
import json
import shlex
from pathlib import Path

import pytest

DEPLOY = Path(__file__).parent.parent / "deploy"
PROXY_ARGS = ["serve", "--upstream", "http://127.0.0.1:8000", "--host", "0.0.0.0",
              "--port", "8080", "--db", "sqlite:////data/preheat.db"]
ENGINE_FLAGS = ["--enable-prefix-caching", "--enable-prompt-tokens-details",
                "--scheduling-policy=priority"]

try:  # PyYAML comes with vLLM; without it the checks read the text
    import yaml
except ImportError:  # pragma: no cover - depends on what is installed
    yaml = None


def load_yaml(name: str) -> list:
    text = (DEPLOY / name).read_text()
    if yaml is None:
        pytest.skip("PyYAML is not installed")
    return [doc for doc in yaml.safe_load_all(text) if doc]


def check_engine_args(args: list[str]) -> None:
    for flag in ENGINE_FLAGS:
        assert flag in args, flag
    # The tool-call parser is the one preheat's own engine would run the model with.
    from engine.tool_parser import parser_for

    [model] = [a.split("=", 1)[1] for a in args if a.startswith("--model=")]
    model = model.removeprefix("${MODEL:-").removesuffix("}")
    assert "--enable-auto-tool-choice" in args
    assert f"--tool-call-parser={parser_for(model)}" in args
    [kv] = [a.split("=", 1)[1] for a in args if a.startswith("--kv-events-config=")]
    config = json.loads(kv)
    assert config["enable_kv_cache_events"] and config["publisher"] == "zmq"
    assert config["endpoint"].startswith("tcp://127.0.0.1:")


def test_engine_flags_are_the_supervisors():
    """What the deploy files pass to vLLM is what Engine passes (so the mirror works)."""
    from engine.supervisor import Engine

    argv = Engine("m").command()
    for flag in ENGINE_FLAGS:
        assert flag.split("=")[0] in argv and flag.split("=")[-1] in argv


def test_compose():
    [compose] = load_yaml("compose.yaml")
    vllm, preheat = compose["services"]["vllm"], compose["services"]["preheat"]
    check_engine_args(vllm["command"])
    [gpu] = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert preheat["command"] == PROXY_ARGS
    assert preheat["network_mode"] == "service:vllm" and "8080:8080" in vllm["ports"]
    assert preheat["depends_on"]["vllm"]["condition"] == "service_healthy"
    assert "preheat-data:/data" in preheat["volumes"] and "preheat-data" in compose["volumes"]
    assert (DEPLOY / preheat["build"]["dockerfile"].removeprefix("deploy/")).is_file()


def test_kubernetes():
    docs = {doc["kind"]: doc for doc in load_yaml("kubernetes.yaml")}
    assert set(docs) == {"PersistentVolumeClaim", "Deployment", "Service"}
    pod = docs["Deployment"]["spec"]["template"]
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    assert set(containers) == {"vllm", "preheat"}
    check_engine_args(containers["vllm"]["args"])
    assert containers["vllm"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    preheat = containers["preheat"]
    assert preheat["args"] == PROXY_ARGS
    [mount] = preheat["volumeMounts"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert mount["mountPath"] == "/data"
    assert claim == docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"] == pod["metadata"]["labels"]
    service = docs["Service"]["spec"]
    assert service["selector"] == pod["metadata"]["labels"]
    [port] = service["ports"]
    assert port["targetPort"] in [p["name"] for p in preheat["ports"]] and port["port"] == 8080


def test_systemd_unit():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string((DEPLOY / "preheat.service").read_text())
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert argv[0].endswith("/preheat") and argv[1] == "serve" and "--model" in argv
    assert argv[argv.index("--db") + 1].startswith("sqlite:////var/lib/preheat/")
    assert unit["Service"]["StateDirectory"] == "preheat"
    assert unit["Service"]["KillSignal"] == "SIGTERM" and unit["Service"]["Restart"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.parametrize("name", ["compose.yaml", "kubernetes.yaml", "preheat.service",
                                  "Dockerfile"])
def test_readme_covers(name):
    assert f"`{name}`" in (DEPLOY / "README.md").read_text()


def test_text_without_yaml():
    """The checks that hold even where PyYAML is missing."""
    for name in ("compose.yaml", "kubernetes.yaml"):
        text = (DEPLOY / name).read_text()
        assert "\t" not in text, f"{name}: tabs are not YAML indentation"
        assert " ".join(json.dumps(a) for a in PROXY_ARGS).replace('" "', '", "') in text
        for flag in ENGINE_FLAGS:
            assert flag in text
