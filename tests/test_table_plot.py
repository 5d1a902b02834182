"""The `osp-eval table` PNG: geometry of the drawn figure (legend placement, headroom, failure markers)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from osp_eval.table import ROW_NAMES, plot_table, table_figure  # noqa: E402

METHODS = ["rtn", "ffn_had", "gptq", "quarot", "spinquant"]
PPL = [3360.11, 690.25, 689.92, 44.69, 42.97]
SUB = "seqlen 128, first 1 of 140 windows — PARTIAL"


def row(model, bits, method, ppl, status="ok"):
    return {"model": model, "bits": bits, "method": method, "ppl": ppl, "status": status}


def grid(slugs, bits_list, value):
    """One row per cell; value(slug, bits, i) gives (ppl, status)."""
    return [row(s, b, m, *value(s, b, i)) for b in bits_list for s in slugs for i, m in enumerate(METHODS)]


def drawn(slugs, bits_list, rows, subtitle=SUB):
    fig = table_figure(slugs, bits_list, METHODS, rows, subtitle)
    fig.canvas.draw()
    return fig, fig.canvas.get_renderer()


def bars(ax):
    return [p for c in ax.containers for p in c]


def value_labels(ax):
    return [t for t in ax.texts if t.get_text().replace(".", "", 1).isdigit()]


def legends(fig):
    """Every legend, wherever it was put (figure or axes)."""
    return fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]


def all_text(fig):
    return [t.get_text() for t in fig.findobj(Text)]


def overlaps(a, b):
    # Strict: boxes that only touch along an edge do not cover each other.
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.fixture
def mixed():
    """alpha all ok; beta all ok but one NaN cell; gamma failed everywhere; two bit settings."""
    slugs, bits_list = ["alpha", "beta", "gamma"], ["4-4-4", "4-8-8"]

    def value(s, b, i):
        if s == "gamma":
            return None, "failed"
        if s == "beta" and b == "4-8-8" and i == 2:
            return None, "nonfinite"
        return PPL[i] / (1 if s == "alpha" else 2), "ok"

    return slugs, bits_list, grid(slugs, bits_list, value)


def test_legend_covers_no_bar_and_no_axes(mixed):
    fig, r = drawn(*mixed)
    assert legends(fig)
    for box in [legend.get_window_extent(r) for legend in legends(fig)]:
        for ax in fig.axes:
            assert not overlaps(box, ax.get_window_extent(r))
            assert not overlaps(box, ax.get_tightbbox(r))  # tick labels, title and y label too
            assert all(not overlaps(box, b.get_window_extent(r)) for b in bars(ax))


def test_value_labels_stay_inside_the_axes(mixed):
    fig, r = drawn(*mixed)
    for ax in fig.axes:
        labels = value_labels(ax)
        assert len(labels) == len(bars(ax)) > 0
        frame = ax.get_window_extent(r)
        for t in labels:
            box = t.get_window_extent(r)
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 < frame.y1 - 2
    assert "3360.1" in [t.get_text() for t in value_labels(fig.axes[0])]


def test_single_huge_value_keeps_its_label_inside():
    rows = [row("m", "4-4-4", m, v) for m, v in zip(METHODS, [3360.11, 42.97, 42.97, 42.97, 42.97])]
    fig, r = drawn(["m"], ["4-4-4"], rows)
    (ax,) = fig.axes
    top = max(value_labels(ax), key=lambda t: t.get_window_extent(r).y1)
    assert top.get_text() == "3360.1"
    assert top.get_window_extent(r).y1 < ax.get_window_extent(r).y1 - 2


def slot_centre(fig, ax, method, model_index, n_models):
    """Display x of the (method, model) slot, and half the slot width there."""
    width = 0.8 / n_models
    x = METHODS.index(method) + (model_index - (n_models - 1) / 2) * width
    to_px = ax.transData.transform
    return to_px((x, 1))[0], (to_px((x + width / 2, 1))[0] - to_px((x - width / 2, 1))[0]) / 2


def test_failed_and_nan_cells_are_marked_in_their_slot(mixed):
    slugs, bits_list, rows = mixed
    fig, r = drawn(slugs, bits_list, rows)
    n_ok = sum(x["status"] == "ok" for x in rows)
    assert sum(len(bars(ax)) for ax in fig.axes) == n_ok
    for ax, bits in zip(fig.axes, bits_list):
        marks = [t for t in ax.texts if t not in value_labels(ax)]
        bad = [x for x in rows if x["bits"] == bits and x["status"] != "ok"]
        assert len(marks) == len(bad)
        for cell in bad:
            centre, half = slot_centre(fig, ax, cell["method"], slugs.index(cell["model"]), len(slugs))
            word = "failed" if cell["status"] == "failed" else "NaN"
            hits = [t for t in marks if word in t.get_text()
                    and abs((t.get_window_extent(r).x0 + t.get_window_extent(r).x1) / 2 - centre) < half]
            assert len(hits) == 1, (bits, cell)
            box, frame = hits[0].get_window_extent(r), ax.get_window_extent(r)
            assert frame.y0 <= box.y0 < frame.y0 + 0.5 * frame.height  # near the bottom, inside the axes


def test_all_failed_model_has_no_legend_entry_but_is_named(mixed):
    fig, _ = drawn(*mixed)
    entries = {t.get_text() for legend in legends(fig) for t in legend.get_texts()}
    assert entries == {"alpha", "beta"}
    assert any("gamma" in t.split("failed", 1)[-1] for t in all_text(fig) if "failed" in t)


def test_subtitle_and_axis_labels_are_shown(mixed):
    fig, _ = drawn(*mixed)
    texts = all_text(fig)
    assert any(SUB in t for t in texts)
    for ax, bits in zip(fig.axes, mixed[1]):
        assert ax.get_title() == f"W-A-KV {bits}"
        assert ax.get_yscale() == "log" and ax.get_ylim()[0] == 1
        assert ax.get_ylabel() == "WikiText-2 PPL (log)"
        assert [t.get_text() for t in ax.get_xticklabels()] == [ROW_NAMES[m] for m in METHODS]


def test_no_ok_value_at_all_is_still_a_figure():
    rows = grid(["x"], ["4-4-4"], lambda s, b, i: (None, "failed"))
    fig, r = drawn(["x"], ["4-4-4"], rows)
    (ax,) = fig.axes
    assert ax.get_ylim() == (1, 10) and not bars(ax)
    assert sum("failed" in t.get_text() for t in ax.texts) == len(METHODS)
    assert any("failed: x" in t for t in all_text(fig))


def test_plot_table_writes_png(tmp_path, mixed):
    path = tmp_path / "table.png"
    slugs, bits_list, rows = mixed
    plot_table(path, slugs, bits_list, METHODS, rows, "seqlen 2048, full test split")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
