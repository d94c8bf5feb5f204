"""How an ES step reaches weights stored in bfloat16 or float16 without being lost to rounding.

The update ``theta += alpha/N * sum_n z_n eps_n`` is summed in float32 and then written into the
weights. Rounded to the nearest bfloat16 (8 significant bits), every coordinate whose step is below half
a unit in the last place (ulp) of its weight keeps its old value: at the paper's alpha 5e-4 and N=30
that is about a quarter of the coordinates of a 0.5B model, and more for smaller steps or larger
weights. The loss is biased (small steps vanish, large ones survive), so it changes what ES learns, not
only how fast. Two standard remedies (``--update-precision``):

- ``master``: float32 master copies of the trained tensors receive the update exactly; the compute
  copy is the master rounded to nearest. Cost: 4 bytes per trained parameter. With full-rank noise ES
  already keeps a pristine copy of the trained tensors for exact restore (2 bytes per parameter in
  bf16), which the master replaces, so the net cost is 2 bytes per parameter; with low-rank population
  batching there is no such copy, and the master adds 4 bytes to the model's 2. Checkpoints hold the
  compute copy (what a user loads) plus the master in ``es-state/master.safetensors`` for ``--resume``.
- ``stochastic``: the updated value is rounded up or down at random with the probabilities that make
  its expectation the exact float32 value (unbiased: a step of a tenth of an ulp moves one coordinate
  in ten by a whole ulp). No extra memory; it adds rounding noise of at most half an ulp per step. The
  random bits are a hash of (the iteration's member seeds, the parameter's name, the coordinate), so
  resume, replay and Ray workers round identically, and CPU and GPU alike (integer arithmetic, no
  device RNG). A counter hash also runs on every core, where torch's CPU generator draws on one.
- ``nearest``: plain round-to-nearest, the behaviour of most ES code; kept to measure what it loses.

``auto`` (the default) picks ``master`` with full-rank noise (it replaces a copy ES keeps anyway) and
``stochastic`` with low-rank noise (which otherwise holds one copy of the model, the point of batching
members). In float32 every mode is the plain update: float32 rounding loses nothing that matters.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

import torch

PRECISIONS = ("auto", "master", "stochastic", "nearest")


def resolve(setting: str, dtypes: Iterable[torch.dtype], lowrank: bool) -> tuple[str, str]:
    """(mode, reason) for the setting ``setting`` over tensors of ``dtypes``: ``float32`` when every tensor
    is float32 (nothing is lost), else master, stochastic or nearest."""
    if setting not in PRECISIONS:
        raise ValueError(f"unknown update precision {setting!r}; use {', '.join(PRECISIONS)}")
    dtypes = set(dtypes)
    if all(d in (torch.float32, torch.float64) for d in dtypes):
        return "float32", "the weights are float32: the step is kept without a remedy"
    if setting != "auto":
        return setting, f"--update-precision {setting}"
    if lowrank:
        return "stochastic", "auto: low-rank noise keeps no copy of the weights, so no master is added"
    return "master", "auto: full-rank noise keeps a copy of the weights anyway; the master replaces it"


def rounding_seed(members: Iterable[tuple[int, int]]) -> int:
    """The seed of an update's stochastic rounding: a hash of the iteration's (seed, sign) members, so
    the same logged update rounds the same way wherever and whenever it is applied."""
    text = ",".join(f"{int(s)}:{int(g)}" for s, g in members)
    digest = hashlib.blake2b(f"round/{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def signed32(v: int) -> int:
    """The low 32 bits of ``v`` as a signed int32 value (how a 32-bit constant enters int32 tensors)."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32), in place on an int32 tensor: every output bit depends
    on every input bit. ``>>`` is arithmetic on int32, so each shift is masked to make it logical."""
    h.bitwise_xor_(h.bitwise_right_shift(16).bitwise_and_(0xFFFF))
    h.mul_(signed32(0x7FEB352D))
    h.bitwise_xor_(h.bitwise_right_shift(15).bitwise_and_(0x1FFFF))
    h.mul_(signed32(0x846CA68B))
    h.bitwise_xor_(h.bitwise_right_shift(16).bitwise_and_(0xFFFF))
    return h


def random_bits(seed: int, offset: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """32 pseudo-random bits (int32) for coordinates offset .. offset+n-1 of stream ``seed``: a hash of
    (seed, coordinate), so any slice of a tensor gets the same bits however it is cut."""
    if offset + n < 1 << 31:
        h = torch.arange(offset, offset + n, dtype=torch.int32, device=device)
    else:
        h = torch.arange(offset, offset + n, dtype=torch.int64, device=device).to(torch.int32)
    h.mul_(signed32(0x9E3779B9)).add_(signed32(seed)).bitwise_xor_(signed32(seed >> 32))
    return _mix32(h)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, seed: int, offset: int = 0) -> torch.Tensor:
    """``x`` (float32) rounded into ``dtype`` up or down at random, unbiased: E[result] = x exactly for
    every finite x inside the range of ``dtype``. The randomness is ``random_bits(seed, offset, ...)``:
    ``x`` is coordinates offset.. of a tensor whose stream is ``seed``. For bfloat16 the result is
    returned as float32 values that bfloat16 holds exactly (copying them into a bf16 tensor casts once,
    in the copy); other dtypes come back in ``dtype``."""
    if x.dtype != torch.float32:
        raise TypeError("stochastic_round takes float32 values")
    if dtype == torch.float32:
        return x.clone()
    bits = random_bits(seed, offset, x.numel(), x.device).view(x.shape)
    if dtype == torch.bfloat16:
        # bfloat16 is float32 with the low 16 bits dropped: add 16 random bits, then truncate. A value
        # whose dropped bits are f (of 2**16) rounds away from zero with probability f / 2**16.
        noise = bits.bitwise_and_(0xFFFF)
        return noise.add_(x.view(torch.int32)).bitwise_and_(-65536).view(torch.float32)
    # any other dtype (float16): the nearest value and its neighbour on the other side of x
    near = x.to(dtype)
    near_f = near.float()
    toward = torch.where(near_f > x, float("-inf"), float("inf")).to(dtype)
    other = torch.nextafter(near, toward)
    other_f = other.float()
    p = ((x - near_f) / (other_f - near_f)).nan_to_num_(0.0, 0.0, 0.0)
    u = bits.bitwise_right_shift_(8).bitwise_and_(0xFFFFFF).float().mul_(2.0**-24)  # uniform [0, 1)
    return torch.where(u < p, other, near)


class StepStats:
    """Running sums comparing the applied step with the intended one, over any number of chunks."""

    def __init__(self) -> None:
        self.sq_old = 0.0  # ||weights before the update||^2
        self.dot = 0.0  # <applied, intended>
        self.sq_applied = 0.0
        self.sq_intended = 0.0
        self.changed = 0  # coordinates whose stored value changed
        self.intended_nonzero = 0  # coordinates the intended step changes
        self.lost = 0  # ... of which the stored value did not move
        self._pending: torch.Tensor | None = None  # add_sums_tensor's sums, not read yet (settle)

    def cosine(self) -> float:
        """cos(applied, intended): 1 when nothing was asked (no intended step), 0 when nothing moved."""
        if self.sq_intended == 0:
            return 1.0
        if self.sq_applied == 0:
            return 0.0
        cos = self.dot / math.sqrt(self.sq_applied * self.sq_intended)
        return max(-1.0, min(1.0, cos))  # float sums can overshoot 1 by an ulp

    def norm_ratio(self) -> float:
        """||applied|| / ||intended|| (1 when nothing was asked)."""
        return math.sqrt(self.sq_applied / self.sq_intended) if self.sq_intended else 1.0

    def lost_fraction(self) -> float:
        """Of the coordinates the intended step changes, the share whose stored value did not move."""
        return self.lost / self.intended_nonzero if self.intended_nonzero else 0.0

    def add(self, applied: torch.Tensor, intended: torch.Tensor) -> None:
        """Both float32, same shape. (The update calls the two halves separately; ``applied`` may be
        overwritten by ``add_applied``.)"""
        self.add_intended(intended)
        self.add_applied(applied.clone(), intended)

    def add_sums(
        self, sq_old: float, sq_intended: float, sq_applied: float, dot: float, wanted: int, moved: int
    ) -> None:
        """A chunk's sums computed elsewhere (the fused update, fused.py): <w,w> of the weights before
        the update, <i,i>, <a,a>, <a,i>, and the counts of coordinates the intended step changes and of
        those whose stored value moved."""
        self.sq_old += sq_old
        self.sq_intended += sq_intended
        self.sq_applied += sq_applied
        self.dot += dot
        self.intended_nonzero += wanted
        self.changed += moved
        self.lost += wanted - moved

    def add_sums_tensor(self, sums: torch.Tensor) -> None:
        """``add_sums``' six values as a float64 tensor on any device (the fused update's), added there
        and read by ``settle``: on a GPU, one wait for the device per update instead of one per chunk."""
        self._pending = sums if self._pending is None else self._pending + sums

    def settle(self) -> None:
        """Fold the sums ``add_sums_tensor`` collected into the totals (the one read from the device)."""
        if self._pending is not None:
            s = self._pending.tolist()
            self._pending = None
            self.add_sums(s[0], s[1], s[2], s[3], int(s[4]), int(s[5]))

    def add_old(self, weights: torch.Tensor) -> None:
        """The weights (any float dtype) of a chunk before the update."""
        self.sq_old += float(torch.linalg.vector_norm(weights.view(-1), dtype=torch.float32)) ** 2

    def add_intended(self, intended: torch.Tensor) -> None:
        """The intended step of one chunk; ``add_applied`` of the same chunk follows."""
        self._chunk = (_sq_norm(intended), int(torch.count_nonzero(intended)))
        self.sq_intended += self._chunk[0]
        self.intended_nonzero += self._chunk[1]

    def add_applied(self, applied: torch.Tensor, intended: torch.Tensor) -> None:
        """The applied step of the chunk last given to ``add_intended``; overwrites ``applied``."""
        sq_intended, wanted = self._chunk
        sq_applied = _sq_norm(applied)
        self.sq_applied += sq_applied
        moved = int(torch.count_nonzero(applied))
        self.changed += moved
        # a coordinate the intended step leaves at 0 stays exactly where it was (x + 0 rounds to x), so
        # the moved coordinates are a subset of the wanted ones: lost = wanted - moved, per chunk
        self.lost += wanted - moved
        # <a, i> = (|a|^2 + |i|^2 - |a - i|^2) / 2: three norms instead of products and sums
        self.dot += (sq_applied + sq_intended - _sq_norm(applied.sub_(intended))) / 2


def _sq_norm(x: torch.Tensor) -> float:
    """||x||^2 of a float32 tensor (vector_norm: the same bits for any alignment and thread count, unlike
    a float32 dot product), summed by the caller in Python floats (float64)."""
    return float(torch.linalg.vector_norm(x.view(-1))) ** 2
