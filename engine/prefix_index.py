"""Which token blocks an engine's prefix cache holds, rebuilt from its KV events.

vLLM names each full block by a hash chained over everything before it, and announces
`BlockStored(block_hashes, parent_block_hash, token_ids, block_size)` when blocks enter its
prefix cache and `BlockRemoved(block_hashes)` when they leave. This index keeps, per block,
its parent and its tokens, and a child table `(parent, block tokens) -> block`, which makes
it a radix tree over whole blocks:

    root ─(t0..t127)─▶ A ─(t128..t255)─▶ B
                         └(u128..u255)─▶ C

`cached_prefix_tokens(tokens)` walks that tree one block of the prompt at a time: linear in
the prompt. The engine may hold the same hash in several physical blocks, so each block
carries a count and leaves the tree when its last copy is removed. A removed parent makes its
descendants unreachable, as it does in vLLM, until it is stored again.

Blocks with extra hash keys (LoRA, cache salt, multimodal) are counted but never matched: a
plain prompt cannot hit them. Pure data structure, no I/O: tests feed it synthetic events
(see `from_prompts`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

BlockKey = tuple[int, Any]  # (KV cache group, block hash)


@dataclass
class _Block:
    parent: BlockKey | None
    tokens: tuple[int, ...]
    copies: int
    indexed: bool  # reachable through the child table


class PrefixIndex:
    """The blocks one engine's prefix cache holds, with prefix lookup by token ids."""

    def __init__(self, block_size: int | None = None) -> None:
        self.block_size = block_size  # learned from the first full BlockStored when None
        self._blocks: dict[BlockKey, _Block] = {}
        self._children: dict[BlockKey | None, dict[tuple[int, ...], BlockKey]] = {}
        self.tokens = 0  # tokens in distinct cached blocks

    # --- public API -------------------------------------------------------------------------

    @property
    def blocks(self) -> int:
        """Distinct cached blocks."""
        return len(self._blocks)

    def clear(self) -> None:
        self._blocks.clear()
        self._children.clear()
        self.tokens = 0

    def stored(
        self,
        block_hashes: Sequence[Any],
        parent_block_hash: Any,
        token_ids: Sequence[int],
        block_size: int,
        group: int = 0,
        matchable: bool = True,
    ) -> None:
        """Apply a BlockStored: consecutive blocks after `parent_block_hash` (None: the root)."""
        if not block_hashes:
            return
        if self.block_size is None and len(token_ids) == block_size * len(block_hashes):
            self.block_size = block_size
        # A partial block (shorter than the engine's) can never be a prefix hit by itself.
        matchable = matchable and block_size == self.block_size
        parent: BlockKey | None = None if parent_block_hash is None else (group, parent_block_hash)
        for i, block_hash in enumerate(block_hashes):
            key = (group, block_hash)
            tokens = tuple(token_ids[i * block_size:(i + 1) * block_size])
            block = self._blocks.get(key)
            if block is not None:
                block.copies += 1
            else:
                block = _Block(parent, tokens, 1, False)
                self._blocks[key] = block
                self.tokens += len(tokens)
                if matchable and len(tokens) == block_size:
                    siblings = self._children.setdefault(parent, {})
                    if tokens not in siblings:  # first one wins; hash collisions are moot
                        siblings[tokens] = key
                        block.indexed = True
            parent = key

    def removed(self, block_hashes: Iterable[Any], group: int = 0) -> None:
        """Apply a BlockRemoved: one physical copy of each block leaves the cache."""
        for block_hash in block_hashes:
            key = (group, block_hash)
            block = self._blocks.get(key)
            if block is None:
                continue  # stored before we were listening; nothing to undo
            block.copies -= 1
            if block.copies > 0:
                continue
            del self._blocks[key]
            self.tokens -= len(block.tokens)
            if block.indexed:
                siblings = self._children[block.parent]
                del siblings[block.tokens]
                if not siblings:
                    del self._children[block.parent]

    def cached_prefix_tokens(self, token_ids: Sequence[int], limit: int | None = None) -> int:
        """Tokens at the start of `token_ids` held in full cached blocks, at most `limit`
        (rounded down to whole blocks)."""
        size = self.block_size
        if not size:
            return 0
        end = len(token_ids) if limit is None else min(limit, len(token_ids))
        parent: BlockKey | None = None
        matched = 0
        while matched + size <= end:
            siblings = self._children.get(parent)
            if siblings is None:
                break
            key = siblings.get(tuple(token_ids[matched:matched + size]))
            if key is None:
                break
            parent = key
            matched += size
        return matched

    # --- for tests and debugging ------------------------------------------------------------

    @classmethod
    def from_prompts(cls, prompts: Iterable[Sequence[int]], block_size: int) -> PrefixIndex:
        """An index holding every full block of `prompts`, hashed the way a chain would be."""
        index = cls(block_size)
        for prompt in prompts:
            parent = None
            full = len(prompt) // block_size * block_size
            for start in range(0, full, block_size):
                block_hash = hash((parent, tuple(prompt[start:start + block_size])))
                if (0, block_hash) not in index._blocks:
                    index.stored([block_hash], parent, prompt[start:start + block_size],
                                 block_size)
                parent = block_hash
        return index

    def check(self) -> None:
        """Raise AssertionError if the child table and the blocks disagree."""
        assert self.tokens == sum(len(b.tokens) for b in self._blocks.values())
        indexed = 0
        for parent, siblings in self._children.items():
            assert siblings, f"empty child table under {parent}"
            for tokens, key in siblings.items():
                block = self._blocks[key]
                assert block.indexed and block.tokens == tokens and block.parent == parent
                indexed += 1
        assert indexed == sum(b.indexed for b in self._blocks.values())
        assert all(b.copies > 0 for b in self._blocks.values())

    def pretty_print(self, max_lines: int = 50) -> str:
        """The tree, one block a line: hash, copies, first tokens."""
        lines: list[str] = []

        def walk(parent: BlockKey | None, depth: int) -> None:
            for tokens, key in self._children.get(parent, {}).items():
                if len(lines) >= max_lines:
                    return
                block = self._blocks[key]
                lines.append(f"{'  ' * depth}{key[1]!s:.12} x{block.copies} {list(tokens[:6])}...")
                walk(key, depth + 1)

        walk(None, 0)
        return "\n".join(lines)
