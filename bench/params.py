"""Print the parameter count of every D-FINE size next to the official figure.

Usage: python bench/params.py

The official counts are those of the official models as built for training (all decoder
layers, denoising embedding included; frozen backbone norms are buffers, not parameters).
"""

from __future__ import annotations

import dfine

OFFICIAL_PARAMS = {
    "n": 3_782_693,
    "s": 10_321_877,
    "m": 19_590_064,
    "l": 31_244_152,
    "x": 62_621_560,
}


def main() -> int:
    print(f"{'size':<6}{'backbone':<10}{'ours':>14}{'official':>14}  match")
    ok = True
    for size, official in OFFICIAL_PARAMS.items():
        model = dfine.build_model(size)
        ours = sum(p.numel() for p in model.parameters())
        ok &= ours == official
        verdict = "yes" if ours == official else "NO"
        print(
            f"{size.upper():<6}{dfine.SIZES[size].backbone:<10}{ours:>14,}{official:>14,}  {verdict}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
