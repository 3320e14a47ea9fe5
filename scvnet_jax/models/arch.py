"""The architecture of a CVNet: the one type the converter, the model, the API and the
trainer use to say which network they mean."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

STAGE_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


@dataclasses.dataclass(frozen=True)
class Arch:
    """depth: ResNet depth (50, 101, 152); width: stem width (64 for the official models,
    smaller for CPU demos); reduction_dim: size of the global descriptor; corr_dim:
    channels of the per-scale compressed local features of the rerank head."""
    depth: int = 50
    width: int = 64
    reduction_dim: int = 2048
    corr_dim: int = 256

    FIELDS = ("depth", "width", "reduction_dim", "corr_dim")

    def __post_init__(self):
        for f in self.FIELDS:
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"architecture field {f} must be a positive integer, got {v!r}")
        if self.depth not in STAGE_DEPTHS:
            raise ValueError(f"depth {self.depth} is not a supported ResNet depth "
                             f"({', '.join(map(str, STAGE_DEPTHS))})")

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> "Arch":
        """From any mapping holding (at least) the four fields, e.g. a config's `model`."""
        missing = [f for f in cls.FIELDS if f not in m]
        if missing:
            raise ValueError(f"architecture fields missing: {', '.join(missing)}")
        return cls(**{f: int(m[f]) for f in cls.FIELDS})

    def asdict(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in self.FIELDS}

    def __str__(self) -> str:
        return (f"CVNet-R{self.depth} (" + ", ".join(f"{k}={v}" for k, v in self.asdict().items())
                + ")")

    @property
    def local_dim(self) -> int:
        """Channels of the local features (last stage-3 block): 16 x width."""
        return 16 * self.width
