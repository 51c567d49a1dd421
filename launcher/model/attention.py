"""Which attention kernel transformers runs (model.attn_implementation), resolved per device.

(A first version: auto is sdpa everywhere; the full rules follow.)
"""

from __future__ import annotations


def resolve_attn_implementation(requested: str, profile, precision: str,
                                flash_attn_installed: bool | None = None) -> tuple[str, str]:
    """(implementation, why) for `requested` on the device `profile` at `precision` (accelerate's word)."""
    if requested != "auto":
        return requested, "model.attn_implementation"
    return "sdpa", "auto: torch's scaled_dot_product_attention"
