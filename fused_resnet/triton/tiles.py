"""The tile every Triton launch uses: chosen by a rule from the view, never by timing.

A kernel's tile is [BLOCK_A, BLOCK_C, BLOCK_B] over the view [n_outer, n_channels, n_inner]
(kernels.py) and its num_warps. Each tile is one more compiled variant of a kernel, so the rule
picks from a few tiles per layout:
  planes (NC*, lanes along S): 64, 256 or 1024 values of S a row, 16, 4 or 2 rows a tile;
  rows (channels_last and S == 1, lanes along C): 16, 64 or 128 channels, 128, 32 or 16 rows;
1024 or 2048 values a tile, 8 to 16 a thread: 16-byte accesses where the strides allow. The
row length (S for planes, C for rows: the dimension the lanes run along) picks the smallest tile
whose row covers it, else the widest.

Why a rule: the split reductions (statistics, backward sums) merge their tiles in a fixed order,
so their bits depend on the tile; a tile chosen by timing would make the statistics differ from
process to process and between the module op and the functional op (tuned separately), and
Triton's autotuner keeps per-call state (`Autotuner.run` writes `nargs`) that two threads'
first calls would share. The reductions always use the rule.

The elementwise kernels (the forward and backward apply), whose results do not depend on the
tile, can instead take the fastest tile of their layout, timed once per shape and dtype:
FUSED_RESNET_TRITON_AUTOTUNE=1 (read at import). The tuner times under a lock, so two threads'
first calls time once and both launch the tile it keeps; tune before a CUDA-graph capture (the
timing launches are not capturable).

Under the Triton interpreter (CPU tests) each layout has one small tile, so the split reductions'
chunks span several tiles and the merge across tiles runs.
"""

import functools
import os
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, Sequence

from . import interpreter_enabled


@dataclass(frozen=True)
class Tile:
    block_a: int
    block_c: int
    block_b: int
    num_warps: int

    @functools.cached_property
    def meta(self) -> dict:
        """The launch's keyword arguments: the kernel's tile constexprs and num_warps."""
        return {"BLOCK_A": self.block_a, "BLOCK_C": self.block_c, "BLOCK_B": self.block_b, "num_warps": self.num_warps}


# GPU tiles, smallest row first; the rule takes the first whose row covers the view's row length.
PLANE_TILES = (Tile(16, 1, 64, 4), Tile(4, 1, 256, 4), Tile(2, 1, 1024, 8))
ROW_TILES = (Tile(128, 16, 1, 4), Tile(32, 64, 1, 4), Tile(16, 128, 1, 4))
GPU_TILES = PLANE_TILES + ROW_TILES

# Interpreter tiles: one per layout, small.
INTERPRETER_PLANE_TILE = Tile(8, 4, 128, 1)
INTERPRETER_ROW_TILE = Tile(256, 16, 1, 1)

INTERPRETED = interpreter_enabled()


def _covering(tiles: Sequence[Tile], row_length: int, lanes: Callable[[Tile], int]) -> Tile:
    for tile in tiles:
        if lanes(tile) >= row_length:
            return tile
    return tiles[-1]


def tile_for(n_channels: int, row_length: int, rows_layout: bool, interpreted: bool = INTERPRETED) -> Tile:
    """The tile of a view: rows layout by its channel count, planes by its row length (n_inner, or
    a split reduction's chunk of it)."""
    if interpreted:
        return INTERPRETER_ROW_TILE if rows_layout else INTERPRETER_PLANE_TILE
    if rows_layout:
        return _covering(ROW_TILES, n_channels, lambda t: t.block_c)
    return _covering(PLANE_TILES, row_length, lambda t: t.block_b)


def candidate_tiles(rows_layout: bool, interpreted: bool = INTERPRETED) -> Sequence[Tile]:
    """The tiles the tuner times for a layout."""
    if interpreted:
        return (tile_for(1, 1, rows_layout, interpreted),)
    return ROW_TILES if rows_layout else PLANE_TILES


class TileTuner:
    """The fastest of candidate tiles per key, timed once: the first caller of a key times every
    candidate under the lock while the others wait, then every caller reads the kept tile.

    `timer(launch)` returns the time of one call of `launch()` (triton.testing.do_bench on a GPU);
    `launch(tile)` runs the kernel with that tile on the caller's own tensors, whose outputs the
    caller writes again with the kept tile afterwards (the kernels tuned here only write them)."""

    def __init__(self, timer: Callable[[Callable[[], None]], float]):
        self.timer = timer
        self._best: Dict[Hashable, Tile] = {}
        self._lock = threading.Lock()

    def tile(self, key: Hashable, candidates: Sequence[Tile], launch: Callable[[Tile], None]) -> Tile:
        best = self._best.get(key)
        if best is not None:
            return best
        with self._lock:
            best = self._best.get(key)
            if best is None and len(candidates) == 1:
                best = self._best[key] = candidates[0]
            elif best is None:
                times = [self.timer(lambda tile=tile: launch(tile)) for tile in candidates]
                best = candidates[min(range(len(candidates)), key=times.__getitem__)]
                self._best[key] = best
        return best

    def clear(self) -> None:
        with self._lock:
            self._best.clear()


def _do_bench(launch: Callable[[], None]) -> float:
    import triton.testing

    return triton.testing.do_bench(launch, warmup=5, rep=25)


def _autotune_requested() -> bool:
    return os.environ.get("FUSED_RESNET_TRITON_AUTOTUNE", "").strip().lower() in ("1", "true", "on", "yes")


# The tuner of the elementwise kernels, or None: every tile by the rule.
apply_tuner = TileTuner(_do_bench) if _autotune_requested() else None
