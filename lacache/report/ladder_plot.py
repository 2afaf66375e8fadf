"""Draw which original token positions each layer holds (the ladder) as a PNG.

    python -m lacache.report.ladder_plot --layers 30 --span 16 --overlap 0 --budget 256 --sink 4 --tokens 2048 --out ladder.png
    python -m lacache.report.ladder_plot --layers 30 --span 8 --overlap 4 --budget 128 --tokens 600 --layout bands --out bands.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lacache.ladder import LAYOUTS, kept_positions


def draw_ladder(num_layers: int, span: int, overlap: int, budget: int, sink: int, num_tokens: int, path: str | Path,
                layout: str = "reference") -> Path:
    import numpy as np

    from lacache.report.figures import pyplot, save_figure

    plt = pyplot()

    held = np.zeros((num_layers, num_tokens), dtype=np.uint8)
    for layer, positions in enumerate(kept_positions(num_layers, span, overlap, budget, sink, num_tokens, layout=layout)):
        held[layer, positions] = 1
    fig, ax = plt.subplots(figsize=(10, 0.18 * num_layers + 1.2))
    ax.imshow(held, aspect="auto", interpolation="nearest", cmap="Greys", origin="lower")
    ax.set_xlabel("original token position")
    ax.set_ylabel("layer")
    ax.set_title(f"LaCache kept positions ({layout} layout): S={span} O={overlap} budget={budget} sink={sink}, "
                 f"after {num_tokens} tokens")
    return save_figure(fig, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--span", type=int, default=16)
    parser.add_argument("--overlap", type=int, default=0)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--layout", choices=LAYOUTS, default="reference",
                        help="reference: layer i keeps offset i mod P (reference code); bands: S-layer bands (paper's text)")
    parser.add_argument("--out", default="reports/ladder.png")
    a = parser.parse_args(argv)
    print(draw_ladder(a.layers, a.span, a.overlap, a.budget, a.sink, a.tokens, a.out, a.layout))


if __name__ == "__main__":
    main()
