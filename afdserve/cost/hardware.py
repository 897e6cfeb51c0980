"""Accelerator figures for the decoding-cost model (no torch).

The four chips of the Step-3 report (Tables 4 and 5) carry the
report's own figures and prices. The others carry public vendor datasheet peaks (dense, no
sparsity) with a rental price that is an *assumption* of this project, overridable with
`parse_prices` / `with_price` (CLI: `--price NAME=USD_PER_HOUR`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

GB = 1e9
TB = 1e12
GBPS_400 = 50e9   # one 400 Gbps NIC in bytes/s
GBPS_200 = 25e9


@dataclass(frozen=True)
class Hardware:
    """One accelerator card.

    All rates are per card. `nic_bytes_per_s` is the scale-out NIC bandwidth of one card
    (one 400 Gbps NIC = 50e9 B/s); a node has `gpus_per_node` cards.
    """

    name: str
    usd_per_hour: float          # rental price of one card
    bf16_flops: float            # dense BF16 peak FLOP/s
    fp8_flops: float | None      # dense FP8 peak FLOP/s; None if the chip has no FP8
    hbm_bytes_per_s: float       # memory bandwidth
    memory_bytes: float          # device memory capacity
    nic_bytes_per_s: float       # scale-out network per card
    gpus_per_node: int = 8
    source: str = ""             # where the figures and the price come from

    def __post_init__(self) -> None:
        for name in ("usd_per_hour", "bf16_flops", "hbm_bytes_per_s", "memory_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"hardware {self.name}: {name} must be positive")

    @property
    def peak_flops(self) -> float:
        """Peak used for costing: FP8 where present, else BF16 (INT8 storage, report Tables 4-5)."""
        return self.fp8_flops if self.fp8_flops else self.bf16_flops

    def flops_for(self, compute: str = "fp8") -> float:
        """Peak for a compute precision: 'fp8' (falls back to BF16 without FP8) or 'bf16'."""
        if compute == "bf16":
            return self.bf16_flops
        if compute == "fp8":
            return self.peak_flops
        raise ValueError(f"compute precision must be 'fp8' or 'bf16', got {compute!r}")

    @property
    def ridge(self) -> float:
        """Roofline ridge point: FLOPs per byte at which compute and bandwidth balance."""
        return self.peak_flops / self.hbm_bytes_per_s

    @property
    def node_nic_bytes_per_s(self) -> float:
        return self.nic_bytes_per_s * self.gpus_per_node

    @property
    def usd_per_flop(self) -> float:
        """U_flop = price / (3600 * peak) (report section 4.2)."""
        return self.usd_per_hour / (3600.0 * self.peak_flops)

    @property
    def usd_per_byte(self) -> float:
        """U_byte = price / (3600 * bandwidth) (report section 4.2)."""
        return self.usd_per_hour / (3600.0 * self.hbm_bytes_per_s)


_REPORT = "Step-3 report (arXiv 2507.19427) Tables 4-5"
_ASSUMED = "price is an afdserve assumption (not from the report), override with --price"

_PRESETS = [
    Hardware("H800", 2.00, 9.89e14, 1.98e15, 3.35 * TB, 80 * GB, GBPS_400,
             source=f"{_REPORT}; 80 GB HBM3, 8 x 400 Gbps"),
    Hardware("H20", 0.80, 1.48e14, 2.96e14, 4.00 * TB, 96 * GB, GBPS_400,
             source=f"{_REPORT}; 96 GB HBM3, 8 x 400 Gbps"),
    Hardware("A800", 0.75, 3.12e14, None, 2.00 * TB, 80 * GB, GBPS_200,
             source=f"{_REPORT}; 80 GB HBM2e, 8 x 200 Gbps; no FP8 (INT8 storage, BF16 compute)"),
    Hardware("910B", 0.67, 2.80e14, None, 1.60 * TB, 64 * GB, GBPS_200,
             source=f"{_REPORT}; price estimated by the report in proportion to FLOPs vs A800; "
             "64 GB HBM2e, 8 x 200 Gbps; no FP8"),
    Hardware("H100", 2.20, 9.89e14, 1.979e15, 3.35 * TB, 80 * GB, GBPS_400,
             source=f"NVIDIA H100 Tensor Core GPU datasheet (SXM5, dense); DGX H100 "
             f"8 x ConnectX-7 400 Gbps; {_ASSUMED}"),
    Hardware("H200", 2.50, 9.89e14, 1.979e15, 4.8 * TB, 141 * GB, GBPS_400,
             source=f"NVIDIA H200 Tensor Core GPU datasheet (SXM, dense); HGX H200 "
             f"8 x 400 Gbps; {_ASSUMED}"),
    Hardware("B200", 3.50, 2.25e15, 4.5e15, 8.0 * TB, 180 * GB, GBPS_400,
             source=f"NVIDIA DGX B200 / HGX B200 datasheet (per GPU, dense = half the "
             f"sparse figures); 8 x ConnectX-7 400 Gbps; {_ASSUMED}"),
    Hardware("L20", 0.50, 1.195e14, 2.39e14, 0.864 * TB, 48 * GB, GBPS_200,
             source=f"NVIDIA L20 datasheet (dense), 48 GB GDDR6; PCIe server NIC assumed "
             f"1 x 200 Gbps per GPU; {_ASSUMED}"),
    Hardware("L40S", 0.90, 3.62e14, 7.33e14, 0.864 * TB, 48 * GB, GBPS_200,
             source=f"NVIDIA L40S datasheet (dense), 48 GB GDDR6; PCIe server NIC assumed "
             f"1 x 200 Gbps per GPU; {_ASSUMED}"),
    Hardware("MI300X", 2.00, 1.307e15, 2.615e15, 5.3 * TB, 192 * GB, GBPS_400,
             source=f"AMD Instinct MI300X datasheet (dense); 8 x 400 Gbps NICs per "
             f"platform; {_ASSUMED}"),
]

HARDWARE_PRESETS: dict[str, Hardware] = {h.name: h for h in _PRESETS}
REPORT_HARDWARE: tuple[str, ...] = ("H800", "H20", "A800", "910B")


def get_hardware(name: str) -> Hardware:
    """A preset by name (case-insensitive; 'Ascend 910B' and 'ascend-910b' name the 910B)."""
    key = name.strip().lower().replace(" ", "").replace("-", "").replace("_", "")
    key = key.removeprefix("ascend")
    for preset, hw in HARDWARE_PRESETS.items():
        if preset.lower() == key:
            return hw
    raise ValueError(f"unknown hardware {name!r}; presets: {', '.join(HARDWARE_PRESETS)}")


def with_price(hw: Hardware, usd_per_hour: float) -> Hardware:
    """A copy of `hw` at another price; the source notes the override."""
    if not usd_per_hour > 0:
        raise ValueError(f"price for {hw.name} must be positive, got {usd_per_hour}")
    return replace(hw, usd_per_hour=float(usd_per_hour),
                   source=f"{hw.source}; price overridden to {usd_per_hour} USD/h")


def parse_prices(spec: str | list[str] | None) -> dict[str, float]:
    """Parse 'H20=1.0,H800=2.5' (or a list of such strings) into {canonical name: price}."""
    if not spec:
        return {}
    items = [spec] if isinstance(spec, str) else list(spec)
    prices: dict[str, float] = {}
    for part in ",".join(items).split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"bad price {part!r}: expected NAME=USD_PER_HOUR, e.g. H20=1.0")
        try:
            price = float(value)
        except ValueError:
            raise ValueError(f"bad price {part!r}: {value!r} is not a number") from None
        if not price > 0:
            raise ValueError(f"bad price {part!r}: must be positive")
        prices[get_hardware(name).name] = price
    return prices


def resolve_hardware(names: str | list[str] | None = None,
                     prices: dict[str, float] | None = None) -> list[Hardware]:
    """Hardware list from 'H800,H20' (default: the report's four chips) with price overrides.

    A priced chip that is not in the list is an error (the override would be silently lost).
    """
    if names is None or names == "" or names == []:
        names = list(REPORT_HARDWARE)
    elif isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    if str(names[0]).strip().lower() == "all":
        names = list(HARDWARE_PRESETS)
    chips = [get_hardware(n) for n in names]
    prices = prices or {}
    listed = {h.name for h in chips}
    for name in prices:
        if name not in listed:
            raise ValueError(f"--price names {name}, which is not in --hardware")
    return [with_price(h, prices[h.name]) if h.name in prices else h for h in chips]
