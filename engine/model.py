"""An offline model for trying preheat and for tests: no download, random weights.

`build_tiny_model(dir)` trains a byte-level BPE tokenizer on text already on the machine
(Python's standard library sources, /usr/share/doc) with ChatML special tokens and a chat
template, and saves it beside a randomly initialised Llama (bf16, head size 64, grouped-query
attention, 16k positions, tied embeddings) as safetensors. Random weights make prefill and
decode cost what a real model of that shape costs; the text it writes is noise.

    256 x 4  ~7M params: fast tests        512 x 8  ~31M params: benchmarks

`ensure_default_model()` builds into the user's cache folder once and reuses it. Builds go to a
temporary folder renamed into place, so a crash never leaves a half-built model behind.

CLI: `python -m engine.model DIR [--hidden N] [--layers N]` (`main(argv)`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

VOCAB_SIZE = 16384
HEAD_DIM = 64
MAX_POSITIONS = 16384
CORPUS_BYTES = 12 * 1024 * 1024  # enough text for a 16k vocabulary in ~10 s on 2 cores
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, as Qwen2 models use it; string or list-of-parts content, optional generation prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Written last: its presence marks a complete model folder.
DONE_MARKER = "preheat-tiny-model.txt"
DEMO_MAX_TOKENS = 128
"""Output tokens of a call that names no `max_tokens`: random weights never write an end of
turn, and an agent sending no limit would otherwise wait for the whole context."""


def cache_dir() -> Path:
    """preheat's cache: $XDG_CACHE_HOME or ~/.cache, /preheat."""
    return Path(os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")) / "preheat"


def default_model_dir(hidden: int = 256, layers: int = 4) -> Path:
    """Where the offline model of this shape lives: `cache_dir()`/models."""
    return cache_dir() / "models" / f"tiny-llama-{hidden}x{layers}"


def is_built(model_dir: Path) -> bool:
    return (Path(model_dir) / DONE_MARKER).is_file()


def ensure_default_model(
    hidden: int = 256, layers: int = 4, model_dir: Path | None = None
) -> Path:
    """The model folder, built first if it is not there yet (about 15 s, once).

    The build runs in a child Python, so that torch and transformers are never imported into
    the caller (the proxy stays small). Blocking: call it from a thread in async code.
    Raises EngineError when the build fails.
    """
    model_dir = Path(model_dir) if model_dir else default_model_dir(hidden, layers)
    if is_built(model_dir):
        cap_output(model_dir)  # a model built before the cap existed
        return model_dir
    argv = [sys.executable, "-m", "engine.model", str(model_dir),
            "--hidden", str(hidden), "--layers", str(layers)]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0 or not is_built(model_dir):
        from engine.errors import EngineError

        said = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise EngineError(
            f"Could not build the offline model in {model_dir} ({said}): install the engine "
            "with `make engine`, or name a model with --model."
        )
    return model_dir


def build_tiny_model(model_dir: Path, hidden: int = 256, layers: int = 4) -> Path:
    """Build tokenizer and random-weight Llama into `model_dir` (replaced if it exists)."""
    if hidden % HEAD_DIM or hidden < 2 * HEAD_DIM:
        raise ValueError(f"hidden must be a multiple of {HEAD_DIM} and at least {2 * HEAD_DIM}")
    if layers < 1:
        raise ValueError("layers must be at least 1")
    model_dir = Path(model_dir).expanduser().absolute()
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.", dir=model_dir.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the model from an engine run as another user
    try:
        tokenizer = _build_tokenizer()
        tokenizer.save_pretrained(tmp)
        _build_weights(tokenizer, hidden, layers).save_pretrained(tmp)
        cap_output(tmp)
        (tmp / DONE_MARKER).write_text(
            f"Random-weight Llama {hidden}x{layers} built by preheat for trying it offline.\n"
            "Its output is noise; name a real model (e.g. Qwen/Qwen2.5-0.5B-Instruct) for text.\n"
        )
        if model_dir.exists():
            shutil.rmtree(model_dir)
        os.replace(tmp, model_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model_dir


def cap_output(model_dir: Path) -> None:
    """Give the model a default output limit (vLLM reads `max_new_tokens` from its
    generation config as the `max_tokens` of calls that send none; a call's own wins)."""
    path = Path(model_dir) / "generation_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        config = {}
    if "max_new_tokens" in config:
        return
    config["max_new_tokens"] = DEMO_MAX_TOKENS
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, path)


def _corpus(limit: int = CORPUS_BYTES) -> Iterator[str]:
    """Local text in a fixed order, so that the tokenizer comes out the same on every machine
    with the same files."""
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path("/usr/share/doc")]
    used = 0
    for root in roots:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if used >= limit:
                return
            if not path.is_file() or "site-packages" in path.parts:
                continue
            text = _read_text(path)
            if text:
                used += len(text)
                yield text


def _read_text(path: Path) -> str | None:
    try:
        if path.suffix == ".py":
            return path.read_text(encoding="utf-8", errors="ignore")
        if path.parts[:4] == ("/", "usr", "share", "doc"):
            if path.suffix == ".gz":
                with gzip.open(path, "rt", encoding="utf-8", errors="ignore") as f:
                    return f.read(1 << 20)
            if path.suffix in ("", ".txt", ".md", ".rst") or path.name == "copyright":
                return path.read_text(encoding="utf-8", errors="ignore")
    except (OSError, EOFError, gzip.BadGzipFile):
        pass
    return None


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=MAX_POSITIONS,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build_weights(tokenizer, hidden: int, layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    heads = hidden // HEAD_DIM
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        # Llama's 8/3 ratio, rounded to a multiple of 16 for the kernels.
        intermediate_size=-(-hidden * 8 // 3 // 16) * 16,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)  # the same weights on every build
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config.bos_token_id = None
    return model


def main(argv: list[str] | None = None) -> int:
    """`preheat tiny-model DIR [--hidden N] [--layers N]`: build the offline model into DIR."""
    parser = argparse.ArgumentParser(
        prog="preheat tiny-model",
        description="Build a random-weight Llama and a locally trained tokenizer, with no network.",
    )
    parser.add_argument("dir", nargs="?", type=Path, help="where to write it "
                        "(default: the user's cache folder, reused when already built)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (multiple of 64)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    args = parser.parse_args(argv)
    try:
        if args.dir is None:
            path = default_model_dir(args.hidden, args.layers)
            if not is_built(path):
                build_tiny_model(path, hidden=args.hidden, layers=args.layers)
        else:
            path = build_tiny_model(args.dir, hidden=args.hidden, layers=args.layers)
    except ImportError as exc:
        print(f"preheat: the model builder needs the engine's packages ({exc.name}); "
              "install them with `make engine`.", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"preheat: could not build the model: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
