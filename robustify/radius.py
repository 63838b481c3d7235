"""Radii as people write them: "8/255", "0.031", 0.5."""
from __future__ import annotations

from fractions import Fraction


def parse_radius(value: str | float | int) -> float:
    """A threat radius δ from a number or a fraction such as "8/255" (δ in pixel units of [0, 1] images)."""
    if isinstance(value, (int, float)):
        return float(value)
    try:
        radius = float(Fraction(value.strip()))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"not a radius: {value!r} "
                         "(write a number such as 0.031 or a fraction such as 8/255)") from None
    if radius < 0:
        raise ValueError(f"a radius cannot be negative: {value!r}")
    return radius
