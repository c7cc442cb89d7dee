"""SentencePiece's `precompiled_charsmap`, the one `tokenizers` normalizer that maps any character to
any string in a single pass, built from a {character: replacement} map.

The format (read by the `spm_precompiled` crate inside `tokenizers`): a little-endian u32 giving the
trie's size in bytes, the trie, then the replacements, each ended by a NUL. The trie is a darts-clone
double array of u32 units over the keys' UTF-8 bytes:
- a node's unit holds its label (the byte that leads to it) in bits 0-7, a has-value flag in bit 8
  and an offset in bits 10-30 (bit 9 would scale it by 256; unused here). Its children sit at
  `base ^ byte`, where `base = position ^ offset`;
- a node with a value has, at `base ^ 0`, a unit with bit 31 set and the value (the replacement's
  position in the strings) in bits 0-30.
The reader takes the *shortest* key that prefixes a grapheme cluster under 6 bytes as the match for
the whole cluster: callers keep characters that extend a cluster out of the map (trainer/export.py
replaces them first).
"""
from __future__ import annotations

import struct

HAS_VALUE, IS_VALUE, MAX_OFFSET = 1 << 8, 1 << 31, 1 << 21


def build(mapping: dict[str, str]) -> bytes:
    """The charsmap that replaces each key of `mapping` (a single character) by its value."""
    strings, at = bytearray(), {}
    for replacement in sorted(set(mapping.values())):
        at[replacement] = len(strings)
        strings += replacement.encode("utf-8") + b"\0"
    units = _double_array({key.encode("utf-8"): at[value] for key, value in mapping.items()})
    trie = struct.pack(f"<{len(units)}I", *units)
    return struct.pack("<I", len(trie)) + trie + bytes(strings)


def _trie(keys: dict[bytes, int]) -> dict:
    """A nested dict per byte; a node's value under the key None."""
    root: dict = {}
    for key, value in keys.items():
        node = root
        for byte in key:
            node = node.setdefault(byte, {})
        node[None] = value
    return root


def _double_array(keys: dict[bytes, int]) -> list[int]:
    """The units of the double array holding `keys`. A node with children takes a fresh block of 256
    slots (its base at the block's start, so every child byte's slot is free); a node with only a
    value takes the lowest free slot as its base and value slot. No two nodes share a base."""
    units, bases = [0], set()
    lowest_free, high = 1, 1  # the lowest slot not taken; one past the highest taken

    def take(slot: int, unit: int) -> None:
        nonlocal high
        if slot >= len(units):
            units.extend([0] * ((slot | 0xFF) + 1 - len(units)))  # a lookup may read any slot of a base
        units[slot], high = unit, max(high, slot + 1)

    def place(position: int, node: dict) -> None:
        nonlocal lowest_free
        children = sorted((byte, child) for byte, child in node.items() if byte is not None)
        if children:
            base = (high + 0xFF) & ~0xFF
        else:
            while units[lowest_free] or lowest_free in bases:
                lowest_free += 1
            base = lowest_free
        if position ^ base >= MAX_OFFSET:
            raise ValueError("charsmap: the trie outgrew darts-clone's offsets (too many keys)")
        bases.add(base)
        units[position] |= (position ^ base) << 10 | (HAS_VALUE if None in node else 0)
        take(base, IS_VALUE | node[None]) if None in node else take(base | 0xFF, 0)
        for byte, _ in children:
            take(base ^ byte, byte)
        for byte, child in children:
            place(base ^ byte, child)

    place(0, _trie(keys))
    return units
