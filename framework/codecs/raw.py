"""Raw storage: a tensor's own bytes (float32, float16 or bfloat16, little-endian), no
coding. For weights a method changes but keeps at full precision: the rotated embedding
and untied LM head of a rotated model, folded norm scales, the sliced matrices of a sliced
model. Storing them keeps the container complete (it decodes to every weight the method
changed), and the ``in_rate`` parameter says whether they count in the container's bits
per weight (see framework.codecs.container.container_size): tensors outside the protocol's
coded set (embedding, head, norms; PROTOCOL.md keeps them at full precision for every
method) are stored with ``in_rate=False`` and reported separately, never dropped.

Importing this module registers the codec.
"""

from __future__ import annotations

import sys

import torch

from framework.codecs.container import EncodedTensor, register_codec

CODEC = "raw"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NAMES = {v: k for k, v in _DTYPES.items()}


def encode_raw(tensor: torch.Tensor, in_rate: bool = True) -> EncodedTensor:
    """The tensor's bytes as they are; decoding gives a bit-identical tensor (on CPU)."""
    if tensor.dtype not in _NAMES:
        raise ValueError(f"raw codec stores {', '.join(_DTYPES)}, not {tensor.dtype}")
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is
        raise ValueError("raw codec writes little-endian bytes only")
    t = tensor.detach().to("cpu").contiguous()
    data = t.view(torch.uint8).numpy().tobytes()
    return EncodedTensor(
        codec=CODEC,
        shape=tuple(t.shape),
        bits=float(torch.finfo(t.dtype).bits),
        params={"dtype": _NAMES[t.dtype], "in_rate": bool(in_rate)},
        sections={"data": data},
    )


def decode_raw(enc: EncodedTensor) -> torch.Tensor:
    dtype = _DTYPES.get(str(enc.params.get("dtype")))
    if dtype is None:
        raise ValueError(f"raw codec: unknown dtype {enc.params.get('dtype')!r}")
    data = enc.sections["data"]
    n = 1
    for s in enc.shape:
        n *= s
    itemsize = torch.finfo(dtype).bits // 8
    if len(data) != n * itemsize:
        raise ValueError(f"raw codec: {len(data)} bytes for {n} {enc.params['dtype']} values")
    flat = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.empty(0, dtype=torch.uint8)
    )
    return flat.view(dtype).reshape(enc.shape).clone()


register_codec(CODEC, decode_raw)
