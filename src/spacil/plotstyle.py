"""How spacil's figures look: one style per run (colour, line, marker) that stays distinct for 20 runs and sets SPA's
ablations apart, a legend outside the axes, and fonts that draw every class name (or a stated fallback).

Used by `spacil report` (curves, matrices), the sweep report, the demo's patch figure and `spacil explain`. matplotlib is
imported inside the functions, as everywhere in spacil: importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

log = logging.getLogger(__name__)

# SPA and its ablations: one warm family (reds, oranges, pinks, browns), dashed; SPA itself solid, thicker, first colour.
SPA_COLOURS = ("#d62728", "#ff7f0e", "#e377c2", "#8c564b", "#fdae6b", "#9e0142", "#c994c7", "#ffd92f", "#a6761d",
               "#fb9a99")
# Every other method: cool and neutral colours, solid lines.
OTHER_COLOURS = ("#1f77b4", "#2ca02c", "#9467bd", "#17becf", "#7f7f7f", "#393b79", "#aec7e8", "#98df8a", "#637939",
                 "#000000", "#9edae5", "#5254a3", "#bcbd22", "#c5b0d5", "#006d5b", "#6b6ecf")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p")
# dash patterns: solid for other methods; SPA's ablations cycle through the dashed ones
SPA_DASHES = ("--", "-.", (0, (1, 1.5)), (0, (5, 1.5, 1, 1.5, 1, 1.5)), (0, (8, 2)), (0, (3, 1, 1, 1)))
OTHER_DASHES = ("-", (0, (1, 1)))


@dataclass(frozen=True)
class RunStyle:
    """What `Axes.plot` gets for one run: colour, line style, marker, line width (and whether it is in SPA's family)."""

    color: str
    linestyle: object
    marker: str
    linewidth: float
    spa_family: bool

    def plot_kwargs(self) -> dict:
        return {"color": self.color, "linestyle": self.linestyle, "marker": self.marker, "linewidth": self.linewidth,
                "markersize": 4 if self.linewidth > 2 else 3.5}


def run_styles(runs: Sequence[tuple[str, str]]) -> list[RunStyle]:
    """One style per run, given as (method, label), in order. SPA's family (method 'spa') takes the warm colours: SPA
    itself (label 'spa') solid and thicker, its ablations dashed; every other method the cool colours and solid lines.
    Colours never repeat while the palettes last (26 runs, at most 10 of them SPA's: a family that outgrows its palette
    borrows the other's unused colours, so any 20 runs get 20 colours), and no two runs share a (line style, marker)
    pair while the pairs last."""
    full = [i for i, (method, label) in enumerate(runs) if method == "spa" and label == "spa"]
    ablations = [i for i, (method, label) in enumerate(runs) if method == "spa" and label != "spa"]
    others = [i for i in range(len(runs)) if runs[i][0] != "spa"]
    colours: dict[int, str] = {}
    spare: list[str] = []  # colours a family leaves unused, for the other family to borrow
    for members, palette in ((full + ablations, SPA_COLOURS), (others, OTHER_COLOURS)):
        colours.update(zip(members, palette))
        spare += list(palette[len(members):])
    every = SPA_COLOURS + OTHER_COLOURS
    for i in full + ablations + others:
        if i not in colours:
            colours[i] = spare.pop(0) if spare else every[i % len(every)]
    used: set[tuple[str, str]] = set()
    styles: dict[int, RunStyle] = {}
    for rank, i in enumerate(full + ablations + others):
        group_dashes, width = (OTHER_DASHES, 2.4) if i in full else (SPA_DASHES, 1.5) if i in ablations else (OTHER_DASHES, 1.5)
        first = ablations.index(i) if i in ablations else 0
        dashes = group_dashes[first % len(group_dashes):] + group_dashes[:first % len(group_dashes)]
        markers = MARKERS[rank % len(MARKERS):] + MARKERS[:rank % len(MARKERS)]
        pairs = [(dash, marker) for dash in dashes for marker in markers]
        dash, marker = next((pair for pair in pairs if (repr(pair[0]), pair[1]) not in used), pairs[0])
        used.add((repr(dash), marker))
        styles[i] = RunStyle(colours[i], dash, marker, width, i not in others)
    return [styles[i] for i in range(len(runs))]


def legend_outside(ax, fontsize: float = 7, title: Optional[str] = None):
    """The axes' legend to the right of the axes box, never over the data (the figure grows to the right to hold it when
    it is drawn with constrained layout or saved with tight bounds)."""
    return ax.legend(fontsize=fontsize, title=title, title_fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                     borderaxespad=0.0, frameon=False)


# Fonts ------------------------------------------------------------------------------------------------------------------
# Names of fonts that carry CJK glyphs, tried first (any other installed font whose character map covers the text is
# found too, after these).
CJK_FONT_HINTS = ("Noto Sans CJK", "Noto Serif CJK", "Source Han Sans", "Source Han Serif", "WenQuanYi", "Droid Sans Fallback",
                  "AR PL", "IPAGothic", "IPAexGothic", "IPAPGothic", "Takao", "Microsoft YaHei", "SimHei", "PingFang",
                  "Hiragino", "Yu Gothic", "Malgun Gothic", "NanumGothic", "UnDotum", "Arial Unicode")
FONT_HINT = "install a font with these glyphs (e.g. Debian/Ubuntu: apt-get install fonts-noto-cjk) to draw them"


@functools.lru_cache(maxsize=None)
def _charmap(path: str) -> frozenset[int]:
    """The code points a font file has glyphs for (read once per file and process: fonts do not change while it runs)."""
    from matplotlib.ft2font import FT2Font

    try:
        return frozenset(FT2Font(path).get_charmap())
    except (OSError, RuntimeError, ValueError):
        return frozenset()


def _default_font_path() -> str:
    import matplotlib
    from matplotlib import font_manager

    return font_manager.findfont(font_manager.FontProperties(family=matplotlib.rcParams["font.family"]),
                                 fallback_to_default=True)


def _missing(texts: Iterable[str], charmap: frozenset[int]) -> set[str]:
    """Characters of `texts` the charmap lacks (white space and control characters never need a glyph)."""
    return {ch for text in texts for ch in text if not ch.isspace() and ch.isprintable() and ord(ch) not in charmap}


def _font_covering(characters: set[str]) -> Optional[str]:
    """The family name of an installed font with a glyph for every one of `characters` (CJK fonts tried first)."""
    from matplotlib import font_manager

    fonts = list(font_manager.fontManager.ttflist)
    fonts.sort(key=lambda f: next((i for i, hint in enumerate(CJK_FONT_HINTS) if f.name.startswith(hint)), len(CJK_FONT_HINTS)))
    wanted = {ord(ch) for ch in characters}
    for font in fonts:
        # matplotlib's 'Last Resort' font maps every code point to a box naming its block: it draws nothing readable
        if not font.name.startswith("Last Resort") and wanted <= _charmap(font.fname):
            return font.name
    return None


def _spelled(text: str, missing: set[str]) -> str:
    """`text` with each character no font can draw written as its code point (U+732B): readable and distinct, no box."""
    return "".join(f"<U+{ord(ch):04X}>" if ch in missing else ch for ch in text)


@contextlib.contextmanager
def fonts_for(texts: Iterable[str]) -> Iterator[Callable[[str], str]]:
    """Inside the block, matplotlib draws every character of `texts`: when the default font lacks some (CJK class names),
    an installed font that has them is added behind it (matplotlib's font fallback). Yields `shown(text)`, the string to
    draw: the text itself, or, when no installed font has a character, the text with that character spelled as its code
    point, after one warning line that names the characters and how to get them drawn (instead of matplotlib's raw
    'Glyph ... missing' warnings, one per glyph, and boxes)."""
    import matplotlib

    texts = [str(t) for t in texts]
    missing = _missing(texts, _charmap(_default_font_path()))
    if not missing:
        yield lambda text: text
        return
    family = _font_covering(missing)
    if family is not None:
        current = list(matplotlib.rcParams["font.family"])
        with matplotlib.rc_context({"font.family": current + [family] if family not in current else current}):
            yield lambda text: text
        return
    listed = "".join(sorted(missing))
    listed = listed if len(listed) <= 12 else listed[:12] + "..."
    log.warning(f"no installed font draws {len(missing)} character(s) of the names in this figure ({listed}): drawn as "
                f"<U+XXXX>; {FONT_HINT}")
    undrawable = set(missing)
    yield lambda text: _spelled(str(text), undrawable)
