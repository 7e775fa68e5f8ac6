"""The dimensions of the random-weight model sets: TINY for tests, REAL for benchmarks.

REAL is Phi-3-vision-128k-instruct (its config.json) with CLIP ViT-L/14-336 as Phi-3-V uses it;
TINY has the same structure with dimensions small enough to build in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass

# Phi-3-V's embedding and logit rows (docs/ARCHITECTURE.md#the-model-interface), the same in
# both sizes because the tokenizer is the real one.
VOCAB_SIZE = 32064
WEIGHT_FORMATS = ("float", "int4")


@dataclass(frozen=True)
class ModelSize:
    """Dimensions of one model set and the weight format it is built with by default.

    Text decoder: ``hidden_size``, ``num_heads`` query heads and ``num_kv_heads`` key/value heads
    of ``head_size``, ``num_layers`` blocks with a SiLU-gated MLP of ``intermediate_size``.
    Vision: a CLIP encoder of ``clip_width`` with ``clip_heads`` heads and an MLP of ``clip_mlp``,
    of whose ``clip_layers`` layers only ``clip_layers_used`` are built (Phi-3-V reads
    hidden_states[-2]); the 2x2 merge gives ``merged_width`` channels, which ``img_projection``
    maps to ``hidden_size`` (Linear, GELU, Linear).
    """

    name: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    num_layers: int
    intermediate_size: int
    clip_width: int
    clip_heads: int
    clip_mlp: int
    clip_layers: int
    clip_layers_used: int
    default_weights: str
    vocab_size: int = VOCAB_SIZE

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.clip_width % self.clip_heads:
            raise ValueError(f"{self.name}: the widths must be whole multiples of the head counts")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: num_heads must be a multiple of num_kv_heads")
        if not 0 < self.clip_layers_used <= self.clip_layers:
            raise ValueError(f"{self.name}: clip_layers_used must be 1..clip_layers")
        if self.default_weights not in WEIGHT_FORMATS:
            raise ValueError(f"{self.name}: default_weights must be one of {WEIGHT_FORMATS}")

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def merged_width(self) -> int:
        """Channels of one merged vision token: 2x2 CLIP patches side by side."""
        return 4 * self.clip_width

    @property
    def projection_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """[K, N] of the two img_projection linears."""
        return (self.merged_width, self.hidden_size), (self.hidden_size, self.hidden_size)


# Phi-3-vision-128k-instruct (config.json) and openai/clip-vit-large-patch14-336.
REAL = ModelSize(
    name="real",
    hidden_size=3072,
    num_heads=32,
    num_kv_heads=32,
    num_layers=32,
    intermediate_size=8192,
    clip_width=1024,
    clip_heads=16,
    clip_mlp=4096,
    clip_layers=24,
    clip_layers_used=23,
    default_weights="int4",  # as the cpu-int4 release
)

# Hidden size 64 and 2 layers; 2 kv heads for 4 query heads, so code that confuses the two fails.
TINY = ModelSize(
    name="tiny",
    hidden_size=64,
    num_heads=4,
    num_kv_heads=2,
    num_layers=2,
    intermediate_size=128,
    clip_width=32,
    clip_heads=2,
    clip_mlp=128,
    clip_layers=3,
    clip_layers_used=2,
    default_weights="float",
)

SIZES = {size.name: size for size in (TINY, REAL)}
