"""Blockwise absmax codecs for model updates: fp32 (``none``), ``bf16``, ``int8`` and 4-bit NormalFloat.

    python -m qwen3vl_sft.fl.compression

prints, for each codec, the bytes per element and the round-trip error on an update shaped like one
of Qwen3-VL-2B's (N(0, 1e-5) per element).

A *packet* is a flat ``{name: tensor}`` dict, so it travels through NVFlare's tensor serialisation
(and its streaming of large messages) like any model: one entry per tensor, one more per quantised
tensor for its block scales (``<name>::absmax``: fp32 for int8, bf16 for NF4) and a header entry (:data:`HEADER_KEY`, the
UTF-8 JSON of :class:`Header` as a uint8 tensor) that says what the packet is.

Quantisation is blockwise absmax (each run of :data:`BLOCK` consecutive elements shares one fp32
scale: its largest magnitude), as in bitsandbytes; NF4's 16 levels are QLoRA's. Written here rather than taken from NVFlare's
``ModelQuantizer`` filters because those need CUDA (bitsandbytes) on both the sites and the server,
and this example's server and CI run on CPU. 1-D tensors and tensors below :data:`MIN_QUANTIZED`
elements (norms, biases: a few KiB) are sent in fp32: quantising them saves nothing that matters.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch

CODECS = ("none", "bf16", "int8", "nf4")
HEADER_KEY = "__qwen3vl_exchange__"
SCALE_SUFFIX = "::absmax"
BLOCK = 64
MIN_QUANTIZED = 4096
CHUNK_BLOCKS = 1 << 16  # blocks quantised at a time: bounds the temporaries of a 311 M-element embedding
SUM_SLICE = 1 << 22  # elements per fp64 slice of FidelitySums
INT8_MAX = 127


class PacketError(ValueError):
    """A packet that cannot be decoded (message says which entry)."""


@dataclass
class Header:
    """What a packet carries: ``kind`` full (weights) or delta (a change), for which round, how coded."""

    kind: str
    codec: str
    round: int = 0
    base_round: int | None = None  # delta: the round of the global it applies to
    shapes: dict[str, list[int]] = field(default_factory=dict)  # quantised entries: the original shape
    block: int = BLOCK

    def to_tensor(self) -> torch.Tensor:
        return torch.frombuffer(bytearray(json.dumps(asdict(self)).encode()), dtype=torch.uint8)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> Header:
        try:
            return cls(**json.loads(bytes(tensor.to(torch.uint8).tolist()).decode()))
        except (ValueError, TypeError) as err:
            raise PacketError(f"packet entry {HEADER_KEY} is not a valid header: {err}") from err


def nf4_levels() -> torch.Tensor:
    """The 16 NormalFloat-4 levels (QLoRA): quantiles of N(0, 1), asymmetric so that 0 is exact,
    scaled into [-1, 1]. Computed from the normal quantile function rather than typed in."""
    offset = 0.9677083  # QLoRA's choice: the outermost levels sit at these quantiles
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (levels / levels.abs().max()).float()


NF4_LEVELS = nf4_levels()
NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2


def is_quantized(tensor: torch.Tensor, codec: str) -> bool:
    return codec in ("int8", "nf4") and tensor.dim() > 1 and tensor.numel() >= MIN_QUANTIZED


def _blocks(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor flattened into fp32 rows of BLOCK elements (zero-padded at the end)."""
    flat = tensor.detach().reshape(-1).float()
    pad = (-flat.numel()) % BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, BLOCK)


def quantize(tensor: torch.Tensor, codec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax per block): int8 codes in [-127, 127], or NF4 indices packed two per uint8."""
    blocks = _blocks(tensor)
    # NF4's scales are bf16 (0.4 % of a scale is nothing beside 4-bit steps): 0.53 instead of 0.56 B/element.
    # The codes are computed against the rounded scale, so decoding reproduces them exactly.
    codes, scales = [], []
    for start in range(0, blocks.shape[0], CHUNK_BLOCKS):
        chunk = blocks[start : start + CHUNK_BLOCKS]
        scale = chunk.abs().amax(dim=1).to(scale_dtype(codec)).float()
        scales.append(scale)
        unit = chunk / torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]  # in [-1, 1]
        if codec == "int8":
            codes.append(torch.round(unit * INT8_MAX).to(torch.int8).reshape(-1))
        else:
            index = torch.bucketize(unit.reshape(-1), NF4_MIDPOINTS).to(torch.uint8)
            codes.append(index[0::2] | (index[1::2] << 4))
    return torch.cat(codes), torch.cat(scales).to(scale_dtype(codec))


def scale_dtype(codec: str) -> torch.dtype:
    return torch.bfloat16 if codec == "nf4" else torch.float32


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, shape: list[int], codec: str) -> torch.Tensor:
    """The fp32 tensor of ``shape`` that :func:`quantize`'s output stands for."""
    numel = math.prod(shape)
    if codec == "int8":
        # copy=True: the packet is never changed; then in place, since a 2B embedding is 1.2 GiB per copy
        unit = codes.to(torch.float32, copy=True).view(-1, BLOCK).div_(INT8_MAX)
    else:
        index = torch.stack([codes & 0x0F, codes >> 4], dim=1).reshape(-1).long()
        unit = NF4_LEVELS[index].view(-1, BLOCK)
    if unit.shape[0] != absmax.numel() or unit.numel() < numel:
        raise PacketError(
            f"codes of {unit.numel()} elements / {absmax.numel()} blocks do not fit shape {shape}"
        )
    return unit.mul_(absmax.float()[:, None]).reshape(-1)[:numel].view(shape)


def raw_dtype(codec: str) -> torch.dtype:
    """The dtype of tensors a codec sends as they are: bf16 for bf16, fp32 otherwise."""
    return torch.bfloat16 if codec == "bf16" else torch.float32


def encode(tensors: Mapping[str, torch.Tensor], header: Header) -> dict[str, torch.Tensor]:
    """A packet of ``tensors`` under ``header`` (whose codec says how each is coded)."""
    if header.codec not in CODECS:
        raise PacketError(f"unknown codec {header.codec!r}; use one of {', '.join(CODECS)}")
    packet: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        encode_into(packet, name, tensor, header)
    packet[HEADER_KEY] = header.to_tensor()
    return packet


def encode_into(packet: dict[str, torch.Tensor], name: str, tensor: torch.Tensor, header: Header) -> None:
    """Add one coded tensor to a packet being built (its header entry is written last, by the caller)."""
    if header.codec not in CODECS:
        raise PacketError(f"unknown codec {header.codec!r}; use one of {', '.join(CODECS)}")
    if is_quantized(tensor, header.codec):
        packet[name], packet[name + SCALE_SUFFIX] = quantize(tensor, header.codec)
        header.shapes[name] = list(tensor.shape)
    else:
        packet[name] = tensor.detach().to("cpu", raw_dtype(header.codec)).contiguous()


def is_packet(params: Mapping | None) -> bool:
    return bool(params) and HEADER_KEY in params


def header_of(packet: Mapping[str, torch.Tensor]) -> Header:
    if HEADER_KEY not in packet:
        raise PacketError(f"not a packet of this example: no {HEADER_KEY} entry")
    return Header.from_tensor(entry(packet, HEADER_KEY))


def tensor_names(packet: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the tensors a packet stands for (not its scale and header entries)."""
    return [name for name in packet if name != HEADER_KEY and not name.endswith(SCALE_SUFFIX)]


def decode_tensor(packet: Mapping[str, torch.Tensor], name: str, header: Header) -> torch.Tensor:
    """One fp32 tensor of a packet (always a new tensor: callers add to what they decode, and must not
    change the packet or what it was made from)."""
    value = entry(packet, name)
    if name not in header.shapes:
        return value.to(torch.float32, copy=True)
    if name + SCALE_SUFFIX not in packet:
        raise PacketError(f"packet entry {name} is quantised but has no {name + SCALE_SUFFIX}")
    return dequantize(value, entry(packet, name + SCALE_SUFFIX), header.shapes[name], header.codec)


def entry(packet: Mapping, key: str) -> torch.Tensor:
    """``packet[key]`` as a tensor. On a server with NVFlare's tensor disk offload the received entries are
    references to files, read by their ``materialize()`` (as FedAvg's aggregation helper reads them)."""
    value = packet[key]
    materialize = getattr(value, "materialize", None)
    return torch.as_tensor(materialize() if callable(materialize) else value)


def decode(packet: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Header]:
    """The fp32 tensors a packet stands for, and its header."""
    header = header_of(packet)
    return {name: decode_tensor(packet, name, header) for name in tensor_names(packet)}, header


def packet_bytes(packet: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a packet's tensors (codes, scales, header): what its message carries beyond framing."""
    return sum(torch.as_tensor(t).numel() * torch.as_tensor(t).element_size() for t in packet.values())


def coded_bytes(shapes: Mapping[str, tuple[int, ...]], codec: str) -> int:
    """Bytes a packet of tensors with these shapes takes, without building it (meta-device counts)."""
    total = 0
    for shape in shapes.values():
        numel = math.prod(shape)
        if codec in ("int8", "nf4") and len(shape) > 1 and numel >= MIN_QUANTIZED:
            blocks = math.ceil(numel / BLOCK)
            scale_bytes = torch.empty((), dtype=scale_dtype(codec)).element_size()
            total += blocks * BLOCK * (1 if codec == "int8" else 0.5) + blocks * scale_bytes
        else:
            total += numel * (2 if codec == "bf16" else 4)
    return int(total)


class FidelitySums:
    """Cosine and relative error (||applied - true|| / ||true||) of an update as the server applies it,
    summed one tensor at a time, so the caller never holds a whole applied copy of the update."""

    def __init__(self):
        self.dot = self.err = self.norm_a = self.norm_t = 0.0

    def add(self, applied: torch.Tensor, true: torch.Tensor) -> None:
        # fp64 sums over slices: whole-tensor fp64 temporaries were ~10 GiB for Qwen3-VL-2B's embedding.
        applied, true = applied.detach().reshape(-1), true.detach().reshape(-1)
        for start in range(0, true.numel(), SUM_SLICE):
            a, t = applied[start : start + SUM_SLICE].double(), true[start : start + SUM_SLICE].double()
            self.dot += float((a * t).sum())
            self.norm_a += float((a * a).sum())
            self.norm_t += float((t * t).sum())
            self.err += float(((a - t) ** 2).sum())

    def scores(self) -> dict[str, float]:
        if self.norm_t == 0.0:
            return {
                "update_cosine": 1.0 if self.norm_a == 0.0 else 0.0,
                "update_rel_error": 0.0 if self.norm_a == 0 else math.inf,
            }
        cosine = self.dot / math.sqrt(self.norm_a * self.norm_t) if self.norm_a > 0 else 0.0
        return {"update_cosine": cosine, "update_rel_error": math.sqrt(self.err / self.norm_t)}


def fidelity(applied: Mapping[str, torch.Tensor], true: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """:class:`FidelitySums` over whole updates."""
    sums = FidelitySums()
    for name, t in true.items():
        sums.add(applied[name], t)
    return sums.scores()


def main() -> None:
    update = {"layer.weight": torch.randn(2048, 6144, generator=torch.Generator().manual_seed(0)) * 1e-5}
    print(f"{'codec':<6}{'bytes/element':>15}{'cosine':>10}{'rel. error':>12}")
    for codec in CODECS:
        packet = encode(update, Header(kind="delta", codec=codec))
        decoded, _ = decode(packet)
        scores = fidelity(decoded, update)
        per_element = (packet_bytes(packet) - packet[HEADER_KEY].numel()) / update["layer.weight"].numel()
        print(
            f"{codec:<6}{per_element:>15.4f}{scores['update_cosine']:>10.5f}{scores['update_rel_error']:>12.5f}"
        )


if __name__ == "__main__":
    main()
