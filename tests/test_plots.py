"""The plots say what their titles claim: a grid of true labels shows no predictions."""

import ast
import io
from pathlib import Path

import nbformat
import numpy as np
from PIL import Image

from helpers.teaching.plots import plot_accuracy_bars, plot_confusion, plot_loss, plot_sample_grid

NAMES = ["zero", "one", "two"]
EXAMPLES = [{"image": Image.new("RGB", (8, 8)), "label": label} for label in range(3)]


def tile_titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


def test_a_grid_without_predictions_reads_the_true_labels_only():
    assert tile_titles(plot_sample_grid(EXAMPLES, NAMES, title="held-out samples (true labels)")) == [
        "true: zero", "true: one", "true: two"]


def test_a_grid_with_predictions_reads_both_and_colours_the_wrong_ones():
    fig = plot_sample_grid(EXAMPLES, NAMES, ["zero", "two", "two"])
    assert tile_titles(fig) == ["true: zero\npred: zero", "true: one\npred: two", "true: two\npred: two"]
    wrong = next(ax for ax in fig.axes if ax.get_title().startswith("true: one"))
    assert wrong.title.get_color() == "crimson"


def test_notebook_04s_true_label_grid_passes_no_predictions():
    notebook = Path(__file__).resolve().parent.parent / "notebooks" / "04_training.ipynb"
    calls = [node for cell in nbformat.read(notebook, as_version=4).cells if cell.cell_type == "code"
             for node in ast.walk(ast.parse(cell.source))
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "plot_sample_grid"]
    assert len(calls) == 1
    titled = {kw.arg: kw.value.value for kw in calls[0].keywords if isinstance(kw.value, ast.Constant)}
    assert "true labels" in titled["title"]
    assert len(calls[0].args) == 2 and "predictions" not in titled  # the true labels are not passed as predictions


def test_class_names_with_dollar_signs_are_drawn_as_written():
    names = ["a$b", "$x^2$", "$x^$"]  # "$x^$" is no valid math: read as math, the figure could not be saved
    examples = [{"image": Image.new("RGB", (8, 8)), "label": label} for label in range(3)]
    figures = [plot_confusion(np.eye(3), names, title="costs $x^$"), plot_sample_grid(examples, names, names[::-1]),
               plot_loss([(1, 2.0), (2, 1.0)], title="$x^$"),
               plot_accuracy_bars({"$x^$": {"constrained": {"accuracy": 0.5}, "generation": {"accuracy": 0.4}}})]
    for fig in figures:
        fig.savefig(io.BytesIO(), format="png")
    assert tile_titles(figures[1])[1] == "true: $x^2$\npred: $x^2$"
    labels = [t for t in figures[0].axes[0].get_xticklabels() if t.get_text()]
    assert [t.get_text() for t in labels] == names and not any(t.get_parse_math() for t in labels)
