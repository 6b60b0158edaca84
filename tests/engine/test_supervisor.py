"""Bad input ends in one sentence of advice; a killed engine comes back by itself."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import sys

import httpx
import pytest

from engine.errors import EngineError, diagnose
from engine import process
from engine.supervisor import Engine, kv_bytes


async def start_error(engine: Engine) -> EngineError:
    with pytest.raises(EngineError) as info:
        await engine.start()
    await engine.stop()
    assert engine.pid is None
    advice = info.value.advice  # one sentence: no traceback, no second line
    assert "Traceback" not in advice and "\n" not in advice and advice.endswith(".")
    return info.value


async def test_model_path_that_does_not_exist(tmp_path):
    error = await start_error(Engine(str(tmp_path / "nowhere")))
    assert "does not exist" in error.advice and "preheat tiny-model" in error.advice


async def test_model_folder_without_config(tmp_path):
    error = await start_error(Engine(str(tmp_path)))
    assert "holds no config.json" in error.advice


AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\nmodel name\t: AMD EPYC\n"


@pytest.mark.parametrize("cpuinfo, dtype", [
    (AVX2_ONLY, "float32"),
    (AVX2_ONLY.replace("avx2", "avx2 avx512f avx512_bf16"), "bfloat16"),
    (AVX2_ONLY.replace("avx2", "avx2 amx_bf16 amx_tile"), "bfloat16"),
    ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", "bfloat16"),  # Arm
    ("processor\t: 0\nFeatures\t: fp asimd\n", "float32"),
    ("", "bfloat16"),  # nothing known of it: vLLM's own choice for such a model
])
def test_bfloat16_only_where_the_processor_computes_it(cpuinfo, dtype):
    assert process.cpu_dtype(cpuinfo) == dtype
    assert process.kv_scale(dtype) == (2 if dtype == "float32" else 1)


def test_the_cpu_engine_runs_in_the_processors_dtype_unless_told(monkeypatch):
    if process.engine_flavour(sys.executable) != "cpu":
        pytest.skip("the CPU build is not installed here")
    monkeypatch.setattr(process, "cpu_dtype", lambda: "float32")
    engine = Engine("m")
    argv = engine.command()
    assert engine.dtype == "float32" and argv[argv.index("--dtype") + 1] == "float32"
    assert kv_bytes(32 << 20) == 64 << 20  # as many tokens as 32 MiB at bfloat16
    assert kv_bytes(32 << 20, dtype="bfloat16") == 32 << 20  # a dtype named wins
    for told in (["--dtype", "bfloat16"], ["--dtype=bfloat16"]):
        engine = Engine("m", engine_args=told)
        argv = engine.command()
        assert engine.dtype == "bfloat16"
        assert sum(a.startswith("--dtype") for a in argv) == 1  # the user's alone


@pytest.fixture
def model_dir(tmp_path):
    """Enough of a model folder for the checks made before vLLM is started."""
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


async def test_port_in_use(model_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        error = await start_error(Engine(str(model_dir), port=port))
    assert f"Port {port}" in error.advice and "already in use" in error.advice


async def test_vllm_not_installed(model_dir, tmp_path):
    # The same interpreter without site-packages: no vLLM there.
    bare = tmp_path / "python"
    bare.write_text(f'#!/bin/sh\nexec "{sys.executable}" -I -S "$@"\n')
    bare.chmod(0o755)
    error = await start_error(Engine(str(model_dir), python=str(bare)))
    assert "not installed" in error.advice and "make engine" in error.advice


@pytest.mark.parametrize(
    ("log", "code", "expected"),
    [
        (["OSError: [Errno 98] Address already in use"], 1, "Port 8000 is already in use"),
        # A socket of the engine's own (here its KV-event replay socket), named by ZeroMQ.
        (["zmq.error.ZMQError: Address already in use (addr='tcp://127.0.0.1:39145')"], 1,
         "Port 39145, which the engine binds for its own use, was taken"),
        (["OSError: [Errno 98] error while attempting to bind on address ('0.0.0.0', 8000): "
          "address already in use"], 1, "Port 8000 is already in use"),
        (["ModuleNotFoundError: No module named 'vllm'"], 1, "not installed"),
        (["ValueError: Invalid repository ID or local directory specified: 'x'"], 1,
         "could not be found or downloaded"),
        (["torch.OutOfMemoryError: CUDA out of memory."], 1, "ran out of memory"),
        (["Transformers does not recognize this architecture"], 1, "cannot load"),
        (["INFO starting", "RuntimeError: boom"], 1, "exited with code 1 during start-up "
         "(RuntimeError: boom)"),
        # vLLM 0.32's words for a cache too small, and the most it says the cache holds.
        (["ValueError: To serve at least one request with the model's max seq len (16384), "
          "(0.12 GiB KV cache is needed, which is larger than the available KV cache memory "
          "(0.06 GiB). Based on the available memory, the estimated maximum model length is "
          "8064. Try increasing `gpu_memory_utilization`",
          "RuntimeError: Engine core initialization failed. See root cause above."], 1,
         "--engine-arg=--max-model-len=N; this cache holds 8064"),
        # The root cause, not the wrapper the API server raises after its engine core died.
        (["ValueError: something new went wrong", "RuntimeError: Engine core initialization "
          "failed. See root cause above. Failed core proc(s): {}"], 1,
         "(ValueError: something new went wrong)"),
        ([], -9, "was killed by signal 9"),
    ],
)
def test_diagnose(log, code, expected):
    error = diagnose(log, code, 8000, log[-1:])
    assert expected in error.advice
    assert str(error).startswith(error.advice)


def test_diagnose_names_the_port_taken():
    log = ["zmq.error.ZMQError: Address already in use (addr='tcp://127.0.0.1:39145')"]
    assert diagnose(log, 1, 8000, log).port_in_use == 39145
    assert diagnose(["OSError: [Errno 98] Address already in use"], 1, 8000, []).port_in_use \
        == 8000  # named nowhere: the engine's HTTP port, the one a user chooses
    assert diagnose(["RuntimeError: boom"], 1, 8000, []).port_in_use is None


async def came_back(states: list[str], seconds: float) -> None:
    """Wait until the engine's states end in a restart that came back (at most `seconds`)."""
    for _ in range(int(seconds / 0.1)):
        if states[-2:] == ["restarting", "ready"]:
            return
        await asyncio.sleep(0.1)


def fake_engine_python(tmp_path, engine_script: str):
    """A Python for `Engine(python=...)` that says vLLM (GPU) is installed and runs
    `engine_script` as vLLM's API server (with its argv), so that the supervisor's own
    behaviour is tested in a second, with or without vLLM on the machine."""
    (tmp_path / "fake_engine.py").write_text(engine_script)
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\n"
                    'case "$1 $2" in\n'
                    '  "-c "*) echo gpu ;;  # the flavour probe (engine.process.engine_flavour)\n'
                    f'  "-m vllm."*) exec "{sys.executable}" "{tmp_path}/fake_engine.py" "$@" ;;\n'
                    '  *) exit 2 ;;\n'
                    "esac\n")
    fake.chmod(0o755)
    return fake


async def test_a_start_is_diagnosed_from_its_own_process_only(model_dir, tmp_path):
    # An engine that fails for a reason of its own, in a work folder whose log holds an
    # earlier process's port clash: the advice is about this failure, with no retry.
    fake = fake_engine_python(tmp_path, "import pathlib, sys\n"
                              f"with open({str(tmp_path / 'runs')!r}, 'a') as f:\n"
                              "    f.write('started\\n')\n"
                              "sys.exit('RuntimeError: boom')\n")
    work = tmp_path / "work"
    work.mkdir()
    (work / "engine.log").write_text(
        "OSError: [Errno 98] Address already in use\nRuntimeError: Engine core initialization "
        "failed. See root cause above.\n")
    error = await start_error(Engine(str(model_dir), python=str(fake), work_dir=work))
    assert "(RuntimeError: boom)" in error.advice and error.port_in_use is None
    assert (tmp_path / "runs").read_text().count("started") == 1


FAKE_ENGINE = """\
import json, socket, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

# What preheat's supervisor needs of vLLM's server: bind the KV-event replay port as vLLM's
# engine core does (and die with ZeroMQ's words when it is taken), then answer /health.
argv = sys.argv
replay = json.loads(argv[argv.index("--kv-events-config") + 1])["replay_endpoint"]
host, port = replay[len("tcp://"):].rsplit(":", 1)
held = socket.socket()
try:
    held.bind((host, int(port)))
except OSError:
    sys.exit(f"zmq.error.ZMQError: Address already in use (addr='{replay}')")


class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


HTTPServer(("127.0.0.1", int(argv[argv.index("--port") + 1])), Health).serve_forever()
"""


async def test_a_restart_whose_replay_port_was_taken_takes_another(model_dir, tmp_path):
    # The engine dies, and its KV-event replay port is taken before a new one binds it.
    fake = fake_engine_python(tmp_path, FAKE_ENGINE)
    engine = Engine(str(model_dir), python=str(fake), health_timeout=30)
    states: list[str] = []
    engine.add_listener(lambda _, state: states.append(state))
    await engine.start()
    try:
        url = engine.base_url
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            taken = busy.getsockname()[1]
            engine._replay_port = taken  # as if another process took it while the engine ran
            os.kill(engine.pid, signal.SIGKILL)
            await came_back(states, 10)
        assert states[-2:] == ["restarting", "ready"] and engine.ready
        assert engine.restarts == 2  # one failed on the port, the next took another
        assert str(taken) not in engine.kv_replay_endpoint and engine.base_url == url
    finally:
        await engine.stop()


async def test_a_port_taken_before_the_engine_binds_it_costs_one_more_try(
        model_dir, tmp_path, monkeypatch, caplog):
    # The race a free port is open to: preheat chooses the KV-event replay port free, and
    # another process binds it before the engine does. (vLLM's own words for it are in
    # test_diagnose; this is what the supervisor does with them.)
    from engine.mirror import KVMirror

    fake = fake_engine_python(tmp_path, FAKE_ENGINE)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        choose = process.free_ports
        chosen: list[int] = []

        def free_ports(host: str, count: int) -> list[int]:
            ports = choose(host, count)
            chosen.append(ports[0])
            return [taken] if len(chosen) == 2 else ports  # HTTP, then replay

        monkeypatch.setattr(process, "free_ports", free_ports)
        engine = Engine(str(model_dir), python=str(fake), health_timeout=30)
        mirror = KVMirror.for_engine(engine)
        await mirror.start()
        try:
            await engine.start()
            assert engine.ready and engine.generation == 2
            assert str(taken) not in engine.kv_replay_endpoint
            assert mirror.replay_endpoint == engine.kv_replay_endpoint  # it asks the new one
            assert f"port {taken} was taken before the engine bound it" in caplog.text
        finally:
            await engine.stop()
            await mirror.stop()


@pytest.mark.engine
@pytest.mark.timeout(120)
async def test_engine_never_healthy(tiny_model):
    error = await start_error(Engine(str(tiny_model), health_timeout=2))
    assert "did not become healthy within 2 s" in error.advice
    assert error.log_lines  # with the engine's last words


@pytest.mark.engine
@pytest.mark.timeout(120)
async def test_engine_exits_during_startup(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["NoSuchForCausalLM"], '
                                          '"model_type": "nosuch"}')
    engine = Engine(str(tmp_path), health_timeout=100)
    error = await start_error(engine)
    assert "cannot load this model's architecture" in error.advice
    assert engine.state == "stopped"


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.timeout(300)
async def test_killed_engine_restarts_and_traffic_flows(running):
    engine, mirror = running.engine, running.mirror
    states: list[str] = []
    engine.add_listener(lambda _, state: states.append(state))
    generation, url = engine.generation, engine.base_url
    os.kill(engine.pid, signal.SIGKILL)
    await came_back(states, 120)
    assert states[-2:] == ["restarting", "ready"] and engine.ready
    assert engine.generation == generation + 1 and engine.base_url == url
    assert mirror.known and mirror.stats().blocks == 0  # a new engine's cache is empty
    prompt = [random.Random(9).randrange(100, 16000) for _ in range(300)]
    async with httpx.AsyncClient(base_url=engine.base_url, timeout=60) as client:
        for expected in (0, 256):
            body = {"model": running.model, "prompt": prompt, "max_tokens": 1}
            reply = (await client.post("/v1/completions", json=body)).json()
            assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == expected
            await mirror.quiesce()
    assert mirror.cached_prefix_tokens(prompt) == 256  # and the mirror follows the new one
