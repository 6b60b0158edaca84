"""The engine's environment: what preheat sets for vLLM, and what it leaves to the user."""

from __future__ import annotations

from engine import process


def test_the_cpu_engine_runs_its_worker_in_process_on_tcmalloc_where_installed(
        tmp_path, monkeypatch):
    lib = tmp_path / "lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
    lib.parent.mkdir(parents=True)
    lib.touch()
    monkeypatch.setattr(process, "TCMALLOC",
                        (str(tmp_path / "lib/*-linux-gnu/libtcmalloc_minimal.so.4"),))
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    env = process.engine_env(tmp_path / "work", cpu=True)
    assert env["LD_PRELOAD"] == str(lib) and env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert "LD_PRELOAD" not in process.engine_env(tmp_path / "work", cpu=False)  # a GPU's vLLM

    monkeypatch.setenv("LD_PRELOAD", "")  # the user's choice, even none, is kept
    assert process.engine_env(tmp_path / "work", cpu=True)["LD_PRELOAD"] == ""
    monkeypatch.delenv("LD_PRELOAD")
    lib.unlink()  # not installed: glibc's malloc
    assert "LD_PRELOAD" not in process.engine_env(tmp_path / "work", cpu=True)
