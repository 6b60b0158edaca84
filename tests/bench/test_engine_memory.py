"""bench/engine_memory.py: memory is counted over the engine's whole process tree, once."""

import os
import subprocess
import sys

from bench.engine_memory import core_mib, pss_by_process, pss_mib, tree


def test_a_child_is_in_the_tree_and_its_memory_counts():
    alone = pss_mib(os.getpid())
    child = subprocess.Popen([sys.executable, "-c",
                              "x = bytearray(64 << 20); import time; time.sleep(30)"])
    try:
        for _ in range(100):  # until the child has touched its 64 MiB
            if pss_mib(child.pid) > 64:
                break
            __import__("time").sleep(0.05)
        assert child.pid in tree(os.getpid()) and os.getpid() not in tree(child.pid)
        assert pss_mib(os.getpid()) - alone > 60  # the child's 64 MiB, counted in the tree
        cmd, mib = pss_by_process(os.getpid())[child.pid]
        assert "bytearray(64 << 20)" in cmd and mib > 60
        assert core_mib({1: ("VLLM::EngineCore", 5.0), 2: (cmd, mib)}) == 5.0
    finally:
        child.kill()
        child.wait()
