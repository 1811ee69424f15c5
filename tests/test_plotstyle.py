"""Figures read at a glance: 20 runs in 20 colours and 20 (line style, marker) pairs, SPA's family apart, the legend
outside the axes, and class names in any script drawn without matplotlib's raw warnings."""

from __future__ import annotations

import logging
import warnings

import matplotlib
import numpy as np
import pytest
from PIL import Image

matplotlib.use("Agg")

from spacil.plotstyle import OTHER_DASHES, SPA_DASHES, fonts_for, run_styles  # noqa: E402
from spacil.report import plot_curves, plot_matrix  # noqa: E402

MIXES = {
    "demo": [("zeroshot", "zeroshot"), ("simplecil", "simplecil"), ("finetune", "finetune"), ("rapf", "rapf"),
             ("proof", "proof"), ("ranpac", "ranpac"), ("bofa", "bofa"), ("engine", "engine"), ("area", "area"),
             ("spa", "spa")] + [("spa", f"spa (ablation {k})") for k in range(6)] + [("x", f"x{k}") for k in range(4)],
    "all SPA ablations": [("spa", f"spa (ablation {k})") for k in range(20)],
    "all SPA seeds": [("spa", "spa")] * 20,
    "no SPA": [(f"m{k}", f"m{k}") for k in range(20)],
}


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_twenty_runs_get_twenty_colours_and_twenty_line_styles(mix):
    runs = MIXES[mix]
    styles = run_styles(runs)
    assert len({s.color for s in styles}) == 20
    assert len({(repr(s.linestyle), s.marker) for s in styles}) == 20


def test_spa_and_its_ablations_are_one_family_apart_from_the_others():
    styles = run_styles(MIXES["demo"])
    by_label = dict(zip([label for _, label in MIXES["demo"]], styles))
    spa_family = [s for (method, _), s in zip(MIXES["demo"], styles) if method == "spa"]
    assert all(s.spa_family for s in spa_family) and not any(s.spa_family for s in styles if s not in spa_family)
    assert by_label["spa"].linestyle == "-" and by_label["spa"].linewidth > max(s.linewidth for s in styles if s is not by_label["spa"])
    assert all(s.linestyle != "-" for s in spa_family if s is not by_label["spa"])  # ablations dashed
    # other methods: solid lines (dotted once their 12 markers are used up), never the ablations' dashes
    assert all(s.linestyle in OTHER_DASHES for s in styles if not s.spa_family)
    assert all(s.linestyle not in SPA_DASHES for s in styles if not s.spa_family)
    warm = {s.color for s in spa_family}
    assert not warm & {s.color for s in styles if not s.spa_family}


def _summaries(labels: list[str]) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for k, label in enumerate(labels):
        curve = list(np.clip(80 - 3 * np.arange(5) + rng.normal(0, 2, 5), 0, 100))
        out.append({"method": "spa" if label.startswith("spa") else label, "label": label, "curve": curve,
                    "task_sizes": [10] * 5, "avg_acc": float(np.mean(curve)), "seed": 0, "folder": f"/runs/{k}"})
    return out


def _drawn_figure(monkeypatch):
    """Where the figure a plot function saves has its axes and legend (pixel boxes) and its legend's entry count."""
    from matplotlib.figure import Figure

    saved = {}
    original = Figure.savefig

    def keep(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        renderer = self.canvas.get_renderer()  # as drawn into the file (the figure is closed after)
        ax = self.axes[0]
        saved.update(figure=self.bbox.frozen(), axes=ax.get_window_extent(renderer).frozen(),
                     legend=ax.get_legend().get_window_extent(renderer).frozen(), entries=len(ax.get_legend().get_texts()))
        return result

    monkeypatch.setattr(Figure, "savefig", keep)
    return saved


def test_the_legend_is_outside_the_axes_and_inside_the_picture(tmp_path, monkeypatch):
    saved = _drawn_figure(monkeypatch)
    labels = [label for _, label in MIXES["demo"]]
    plot_curves(_summaries(labels), tmp_path / "curves.png")
    legend, axes_box, figure = saved["legend"], saved["axes"], saved["figure"]
    assert not legend.overlaps(axes_box) and legend.x0 >= axes_box.x1  # right of the axes, never over a line
    assert figure.contains(legend.x0, legend.y0) and figure.contains(legend.x1 - 1, legend.y1 - 1)  # not cut off
    assert saved["entries"] == 20
    assert Image.open(tmp_path / "curves.png").size[0] > 900


def _no_raw_warnings(caught, err: str) -> None:
    assert not [w for w in caught if "missing from font" in str(w.message) or "Glyph" in str(w.message)]
    assert "Glyph" not in err and "missing from font" not in err


def test_cjk_names_are_drawn_or_spelled_without_raw_warnings(tmp_path, capsys, caplog):
    names = ["猫 (cat)", "犬", "spa"]
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="spacil.plotstyle"):
        warnings.simplefilter("always")
        plot_curves(_summaries(names), tmp_path / "curves.png")
        plot_matrix(np.full((3, 3), 50.0), tmp_path / "matrix.png", "猫: accuracy matrix")
    _no_raw_warnings(caught, capsys.readouterr().err)
    said = [record.getMessage() for record in caplog.records]
    with fonts_for(names) as shown:
        spelled = shown("猫 (cat)")
    if spelled == "猫 (cat)":  # a font with these glyphs is installed: drawn as they are, nothing said
        assert not said
    else:  # none: one line per figure naming the characters and how to get them drawn
        assert spelled == "<U+732B> (cat)"
        assert len(said) == 2 and all("fonts-noto-cjk" in line and "猫" in line for line in said)


def test_a_character_the_default_font_lacks_is_drawn_with_an_installed_font_that_has_it(tmp_path):
    # U+2312 (arc) is missing from DejaVu Sans and present in STIXGeneral, which matplotlib ships: the fallback is found
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with fonts_for(["arc ⌒"]) as shown:
            assert shown("arc ⌒") == "arc ⌒"
            assert len(matplotlib.rcParams["font.family"]) == 2  # the default, then the font that has the glyph
            figure = matplotlib.figure.Figure()
            figure.subplots().set_title(shown("arc ⌒"))
        figure.savefig(tmp_path / "arc.png")
    _no_raw_warnings(caught, "")


def test_an_explain_figure_with_cjk_class_names_and_sentences(tmp_path, capsys):
    from spacil.explain import draw

    names = ["猫", "犬", "鳥"]
    record = {"method": "spa", "label": "spa", "shows": "global + patches", "logit_scale": 100.0, "classes": names,
              "logits": [3.0, 2.0, 1.0], "predicted": "猫", "patch_weight": 0.5, "global": [0.3, 0.2, 0.1],
              "patch": [0.2, 0.1, 0.0],
              "top": [{"class": n, "logit": 3.0 - i, "global": 0.3 - i / 10, "patch": 0.2 - i / 10} for i, n in enumerate(names)],
              "explained": [{"class": "猫", "column": 0, "role": "predicted", "picked": [0, 3], "relevance": [0.1, 0.2, 0.3, 0.4],
                             "plan": [[0.5, 0.0], [0.0, 0.5]], "sentences": ["ひげがある。", "four legs."],
                             "token_sentence": [0, 1]}]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        draw(Image.new("RGB", (64, 64), "gray"), record, tmp_path / "explain.png", (2, 2))
    _no_raw_warnings(caught, capsys.readouterr().err)
    assert (tmp_path / "explain.png").stat().st_size > 5_000
