"""Counter-based noise for sampling: the same (seed, token index) gives the same draw on any batch row.

A sequence's ``i``-th token is drawn with uniforms ``u[v]`` (one per vocabulary entry ``v``) that are a
SplitMix64 hash of (seed, i, v): `key` hashes (seed, i) on the host into one int64 per row, and `uniforms`
runs SplitMix64 from that key over the vocabulary on the device, in int64 tensor arithmetic (products wrap,
as the hash wants). `draw` turns them into Gumbel noise, so ``argmax(scores / T + g)`` is an exact draw
from ``softmax(scores / T)`` (the exponential race ``argmax(p / E)`` in log space). No generator object,
no global RNG, nothing that depends on which rows share the batch.
"""

from __future__ import annotations

import torch

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 that holds it."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _mix64(z: int) -> int:
    """SplitMix64's finaliser, on Python ints (the device version is `uniforms`)."""
    z = ((z ^ (z >> 30)) * _MIX1) & _M64
    z = ((z ^ (z >> 27)) * _MIX2) & _M64
    return z ^ (z >> 31)


def key(seed: int, index: int) -> int:
    """The key of the noise for a sequence's ``index``-th token: a hash of (seed, index), as an int64."""
    return _signed(_mix64((_mix64(seed & _M64) + index * _GOLDEN) & _M64))


_WEYL: dict[tuple[torch.device, int], torch.Tensor] = {}


def uniforms(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniforms in (0, 1), ``[len(keys), vocab]`` float32: entry ``v`` of row ``r`` is the top 23 bits of
    SplitMix64's output at state ``keys[r] + (v + 1) * golden``. int64 products wrap, as the hash wants."""
    weyl = _WEYL.get((keys.device, vocab))
    if weyl is None:
        weyl = _WEYL[keys.device, vocab] = torch.arange(1, vocab + 1, device=keys.device) * _signed(_GOLDEN)
    x = keys.unsqueeze(1) + weyl
    shifted = torch.empty_like(x)  # in place throughout: on the CPU, fresh [rows, vocab] buffers cost more
    for bits, multiplier in ((30, _MIX1), (27, _MIX2), (31, 0)):
        torch.bitwise_right_shift(x, bits, out=shifted)
        x ^= shifted.bitwise_and_((1 << (64 - bits)) - 1)  # a logical shift: torch's >> is arithmetic
        if multiplier:
            x *= _signed(multiplier)
    # 23 bits, so that n + 0.5 is exact in float32: u lies in [2^-24, 1 - 2^-24], never 0 or 1.
    return x.bitwise_right_shift_(41).bitwise_and_((1 << 23) - 1).float().add_(0.5).mul_(2.0**-23)


def draw(filtered: torch.Tensor, temperature: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Each row's token: ``argmax(filtered / T + Gumbel noise)``, a draw from ``softmax(filtered / T)``
    (-inf entries are never drawn), with ``keys`` from `key`.

    On the CPU in blocks of 8 rows: whole-batch int64 temporaries (16 MB at 64 x 32k) miss the caches and
    page-fault, 2.7x slower there; on a GPU one block.
    """
    block = filtered.shape[0] if filtered.device.type != "cpu" else 8
    drawn = []
    for start in range(0, filtered.shape[0], block):
        u = uniforms(keys[start : start + block], filtered.shape[1])
        gumbel = u.log_().neg_().log_().neg_()  # -log(-log u): argmax(s + g) = argmax(p / E), E = -log u
        tempered = filtered[start : start + block] / temperature[start : start + block].unsqueeze(1)
        drawn.append((tempered + gumbel).argmax(dim=1))
    return drawn[0] if len(drawn) == 1 else torch.cat(drawn)
