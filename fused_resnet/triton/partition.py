"""Where a Triton launch runs and in what pieces: the view of a tensor as the kernels see it, the
plan of the split reductions, each launch's tile (tiles.py) and grid.

`as_if_on_gpu(sm_count)` plans and tiles every launch as on a GPU whatever the tensors' device:
with launch.count_specializations(launch=False), the GPU run's compiles are counted here
(benchmarks/triton_count.py).
"""

import contextlib
import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
from torch import Tensor
from torch._library.triton import is_wrap_triton_enabled

from ..contract import canonical_layout
from . import launch, tiles

# CUDA's limit on a grid's x dimension: the tile grids are flat.
_MAX_PROGRAMS = 2**31 - 1


# ---------------------------------------------------------------------------------------------
# The view (docs/design.md): N, C, S and the layout, the fields of the C++ View. The kernels
# (kernels.py) index it as [outer, C, inner]: the planes layout as [N, C, S], the rows layout
# as [N*S, C, 1].


@dataclass(frozen=True)
class View:
    N: int
    C: int
    S: int  # the product of the spatial sizes
    rows: bool  # [N*S][C] rows of C (channels_last, or S == 1); else [N][C][S] planes of S

    @property
    def outer(self) -> int:
        return self.N * self.S if self.rows else self.N

    @property
    def inner(self) -> int:
        return 1 if self.rows else self.S

    @property
    def M(self) -> int:
        """Values per channel."""
        return self.N * self.S


def view_of(x: Tensor) -> View:
    """The view of a canonical (contract.canonical_layout), non-empty input."""
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // (n * c)
    return View(n, c, s, s == 1 or not x.is_contiguous())


def _memory_format(x: Tensor):
    """The memory format of the canonical input x."""
    if x.is_contiguous():
        return torch.contiguous_format
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def view_strides(t: Tensor, view: View):
    """Strides of t seen as [outer, C, inner], or None if t cannot be seen so."""
    try:
        if view.rows:
            return t.movedim(1, -1).view(view.outer, view.C, 1).stride()
        return t.view(view.outer, view.C, view.inner).stride()
    except (RuntimeError, ValueError):  # dimensions that do not merge into one (a strided slice);
        return None  # a fake tensor (torch.compile, opcheck) says so with a ValueError


def operand(t: Tensor, x: Tensor, view: View):
    """(tensor, strides) to read t with: t itself when it fits the view of x with unit or zero
    stride along the fastest dimension (coalesced or broadcast loads), else t in x's format."""
    strides = view_strides(t, view)
    fastest = 1 if view.rows else 2
    if strides is None or strides[fastest] not in (0, 1):
        t = t.contiguous(memory_format=_memory_format(x))
        strides = view_strides(t, view)
    return t, strides


# ---------------------------------------------------------------------------------------------
# Launch plan of the split reductions.

_MAX_SPLITS = 1024


@dataclass(frozen=True)
class ReductionPlan:
    """The reduction over (outer, inner) split into splits_a x splits_b rectangles of
    chunk_a x chunk_b values per channel; one program per (channel block, rectangle)."""

    chunk_a: int
    chunk_b: int
    splits_a: int
    splits_b: int

    @property
    def num_splits(self) -> int:
        return self.splits_a * self.splits_b


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# The GPU the launches are planned for when they are only counted (as_if_on_gpu), or None.
_counted_gpu_sms: Optional[int] = None


@contextlib.contextmanager
def as_if_on_gpu(sm_count: int):
    """Plan and tile every launch as on a GPU with `sm_count` SMs, whatever the tensors' device:
    with launch.count_specializations(launch=False), the GPU run's specializations, counted here."""
    global _counted_gpu_sms
    previous, _counted_gpu_sms = _counted_gpu_sms, sm_count
    try:
        yield
    finally:
        _counted_gpu_sms = previous


def planned_for_gpu(device: torch.device) -> bool:
    return _counted_gpu_sms is not None or (device.type == "cuda" and not launch.INTERPRETED)


def _parallelism(device: torch.device):
    """(programs to aim for, least values one program should reduce) on `device`.

    On a GPU: 4 programs per SM, and at least 32K values per program (a few microseconds of
    memory traffic, so the partials and the combine cost little). Under the interpreter: small
    numbers, so that the tests' small shapes really split.
    """
    if _counted_gpu_sms is not None:
        return 4 * _counted_gpu_sms, 32768
    if planned_for_gpu(device):
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device()), 32768
    return 8, 256


def _round_up(value: int, multiple: int) -> int:
    return triton.cdiv(value, multiple) * multiple


def plan_reduction(view: View, device: torch.device) -> ReductionPlan:
    """Split a channel's values until the grid has about the target number of programs, as long
    as each program keeps at least the minimum work. Splits go along outer first (whole rows of
    inner values), then along inner when there are fewer rows than splits."""
    target_programs, min_work = _parallelism(device)
    channels_per_program = min(view.C, 64) if view.rows else 1
    channel_programs = triton.cdiv(view.C, channels_per_program)
    splits = min(
        triton.cdiv(target_programs, channel_programs),
        view.M * channels_per_program // min_work,
        _MAX_SPLITS,
    )
    splits = max(splits, 1)
    if view.outer >= splits or view.rows:
        row_align = 16 if view.rows else 1
        chunk_a = min(_round_up(triton.cdiv(view.outer, splits), row_align), view.outer)
        return ReductionPlan(chunk_a, view.inner, triton.cdiv(view.outer, chunk_a), 1)
    chunk_b = min(_round_up(triton.cdiv(view.inner, triton.cdiv(splits, view.outer)), 64), view.inner)
    return ReductionPlan(1, chunk_b, view.outer, triton.cdiv(view.inner, chunk_b))


def reduction_plan(input: Tensor) -> ReductionPlan:
    """The plan the statistics and backward reductions use for `input` (non-empty)."""
    return plan_reduction(view_of(canonical_layout(input)), input.device)


# ---------------------------------------------------------------------------------------------
# Tiles and grids (tiles.py).


def reduce_tile(view: View, plan: ReductionPlan, device: torch.device) -> tiles.Tile:
    """A split reduction's tile: by the rule only (its bits depend on the tile)."""
    interpreted = not planned_for_gpu(device)
    return tiles.tile_for(view.C, min(view.inner, plan.chunk_b), view.rows, interpreted)


def apply_tile(view: View, device: torch.device, key, run) -> tiles.Tile:
    """An elementwise kernel's tile: the rule's, or the tuner's fastest for `key` (run(tile)
    launches the kernel with a tile on the caller's tensors)."""
    interpreted = not planned_for_gpu(device)
    tuner = tiles.apply_tuner
    if tuner is None or interpreted or _counted_gpu_sms is not None or is_wrap_triton_enabled():
        return tiles.tile_for(view.C, view.inner, view.rows, interpreted)
    return tuner.tile(key, tiles.candidate_tiles(view.rows, interpreted), run)


def tile_grid(view: View, tile: tiles.Tile):
    programs = (
        triton.cdiv(view.outer, tile.block_a)
        * triton.cdiv(view.C, tile.block_c)
        * triton.cdiv(view.inner, tile.block_b)
    )
    if programs > _MAX_PROGRAMS:
        raise RuntimeError(
            f"fused_resnet triton backend: {view.outer * view.C * view.inner} values need "
            f"{programs} programs of {tile.block_a * tile.block_c * tile.block_b}; a grid holds at most {_MAX_PROGRAMS}"
        )
    return (programs,)
