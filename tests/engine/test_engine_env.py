"""The engine's environment: what preheat sets for vLLM, and what it leaves to the user."""

from __future__ import annotations

from engine import process


def test_the_cpu_engine_runs_its_worker_in_process_and_takes_the_users_preload(
        tmp_path, monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    cpu = process.engine_env(tmp_path / "work", cpu=True)
    assert cpu["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and "LD_PRELOAD" not in cpu
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in process.engine_env(tmp_path / "work", cpu=False)
    assert cpu["TMPDIR"].startswith(str(tmp_path / "work"))  # its temporary files, in its folder

    lib = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"  # an allocator of one's choice
    monkeypatch.setenv("LD_PRELOAD", lib)
    assert process.engine_env(tmp_path / "work", cpu=True)["LD_PRELOAD"] == lib


def test_the_cpu_engine_keeps_few_onednn_primitives_unless_told_otherwise(tmp_path, monkeypatch):
    """oneDNN's own cache of 1,024 compiled shapes grew the CPU engine for as long as it ran."""
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    cpu = process.engine_env(tmp_path / "work", cpu=True)
    assert cpu["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(process.ONEDNN_PRIMITIVES) == "64"
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in process.engine_env(tmp_path / "w", cpu=False)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "1024")  # one's own
    cpu = process.engine_env(tmp_path / "work", cpu=True)
    assert cpu["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "1024"


def test_vllms_cache_outlives_the_engine_in_preheats_cache_or_the_users(tmp_path, monkeypatch):
    """What vLLM learns of the model's class (15 s of each start to work out again) is kept
    across starts, where the user put vLLM's cache or in preheat's own."""
    monkeypatch.delenv("VLLM_CACHE_ROOT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    for work in ("first", "second"):  # each engine start has a work folder of its own
        env = process.engine_env(tmp_path / work, cpu=True)
        assert env["VLLM_CACHE_ROOT"] == str(tmp_path / "xdg/preheat/vllm")
    assert (tmp_path / "xdg/preheat/vllm").is_dir()

    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "mine"))
    assert process.engine_env(tmp_path / "w", cpu=False)["VLLM_CACHE_ROOT"] == str(
        tmp_path / "mine")


def test_vllms_cache_falls_back_to_the_work_folder_where_preheats_cannot_be_made(
        tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_CACHE_ROOT", raising=False)
    (tmp_path / "file").write_text("")  # a cache home that is a file: no folder under it
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    env = process.engine_env(tmp_path / "work", cpu=True)
    assert env["VLLM_CACHE_ROOT"] == str(tmp_path / "work/cache/vllm")
    assert (tmp_path / "work/cache/vllm").is_dir()
