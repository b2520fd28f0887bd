"""Every figure a run writes can be read on its own: titles, axis labels, legends off the data.

The checks look at the matplotlib objects, not at pixels. ``assert_readable`` is meant for
reuse: a test of the CLI can record the figures it saves (monkeypatch
``matplotlib.figure.Figure.savefig``) and pass each one to it; ``from test_plots import
assert_readable`` works because pytest puts tests/ on sys.path.
"""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from bayeszoo.guides.amortized import AmortizedNormal  # noqa: E402
from bayeszoo.inference import plots  # noqa: E402
from bayeszoo.models.vae import VAE, ConditionalVAE  # noqa: E402

# ----------------------------------------------------------------------------- the reusable check


def _is_public(label) -> bool:
    """matplotlib gives unlabelled artists labels starting with an underscore."""
    return bool(label) and not str(label).startswith("_")


def _data_axes(figure) -> list:
    """Axes that draw data; colour-bar axes are the colour scale, not data."""
    return [ax for ax in figure.axes if ax.get_label() != "<colorbar>"
            and (ax.lines or ax.collections or ax.images or ax.patches)]


def _drawn_artists(ax) -> list:
    """Lines, scatters and bands, bar groups as one artist each, and any loose patch."""
    in_containers = {id(patch) for container in ax.containers for patch in container}
    loose_patches = [patch for patch in ax.patches if id(patch) not in in_containers]
    return [*ax.lines, *ax.collections, *ax.containers, *loose_patches]


def _legends(figure) -> list:
    return [ax.get_legend() for ax in figure.axes if ax.get_legend() is not None] + list(figure.legends)


def _has_tick_labels(axis) -> bool:
    return any(label.get_visible() and label.get_text() for label in axis.get_ticklabels())


def _inside(inner, outer, slack: float = 1.0) -> bool:
    return (inner.x0 >= outer.x0 - slack and inner.y0 >= outer.y0 - slack
            and inner.x1 <= outer.x1 + slack and inner.y1 <= outer.y1 + slack)


def readability_problems(figure) -> list[str]:
    """What a reader of the saved figure would miss; empty when the figure is readable.

    * every axes that shows data has a title, or the figure a suptitle;
    * an axis with tick labels has an axis label;
    * every drawn line, collection, bar group or loose patch on an axes without images has a
      label, and the legend names exactly those labels (a scatter coloured through a colour bar
      is named by the colour bar's label instead);
    * no legend overlaps an axes that shows data, and legends and texts lie inside the figure
      (the CLI saves without ``bbox_inches="tight"``, so anything outside is cut off).
    """
    figure.canvas.draw()  # tick labels and extents exist only after a draw
    renderer = figure.canvas.get_renderer()
    problems = []
    data_axes = _data_axes(figure)
    if not data_axes:
        problems.append("the figure draws no data")
    has_suptitle = bool(figure.get_suptitle())
    legend_texts = [text.get_text() for legend in _legends(figure) for text in legend.get_texts()]
    drawn_labels = []
    for index, ax in enumerate(data_axes):
        name = f"axes {index} ({ax.get_title()!r})"
        if not (ax.get_title() or has_suptitle):
            problems.append(f"{name} has no title and the figure no suptitle")
        if _has_tick_labels(ax.xaxis) and not ax.get_xlabel():
            problems.append(f"{name} has x tick labels but no x label")
        if _has_tick_labels(ax.yaxis) and not ax.get_ylabel():
            problems.append(f"{name} has y tick labels but no y label")
        if ax.images:
            continue  # an image panel is named by its title and axis labels
        for artist in _drawn_artists(ax):
            colour_bar = getattr(artist, "colorbar", None)  # set on a mappable that has a colour bar
            if colour_bar is not None:
                if not (colour_bar.ax.get_ylabel() or colour_bar.ax.get_xlabel()):
                    problems.append(f"{name} has a colour bar without a label")
            elif not _is_public(artist.get_label()):
                problems.append(f"{name} draws an unlabelled {type(artist).__name__}")
            else:
                drawn_labels.append(artist.get_label())
    missing = sorted(set(drawn_labels) - set(legend_texts))
    stale = sorted(set(legend_texts) - set(drawn_labels))
    if missing:
        problems.append(f"the legend does not name {missing}")
    if stale:
        problems.append(f"the legend names {stale}, which nothing draws")
    figure_box = figure.bbox
    for legend in _legends(figure):
        box = legend.get_window_extent(renderer)
        if any(box.overlaps(ax.get_window_extent(renderer)) for ax in data_axes):
            problems.append("a legend overlaps an axes that shows data")
        if not _inside(box, figure_box):
            problems.append("a legend reaches outside the figure")
    texts = [figure._suptitle] if has_suptitle else []
    for ax in data_axes:
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label]
    for text in texts:
        if text.get_text() and not _inside(text.get_window_extent(renderer), figure_box):
            problems.append(f"the text {text.get_text()!r} reaches outside the figure")
    return problems


def assert_readable(figure) -> None:
    problems = readability_problems(figure)
    assert not problems, "figure is hard to read:\n  " + "\n  ".join(problems)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


# ----------------------------------------------------------------------------- the check can fail


def test_check_flags_a_figure_without_labels_or_legend():
    figure, ax = plt.subplots()
    ax.plot([0, 1], [0, 1], label="line")
    ax.scatter([0.5], [0.5])
    problems = readability_problems(figure)
    assert "axes 0 ('') has no title and the figure no suptitle" in problems
    assert "axes 0 ('') has x tick labels but no x label" in problems
    assert "axes 0 ('') has y tick labels but no y label" in problems
    assert "axes 0 ('') draws an unlabelled PathCollection" in problems
    assert "the legend does not name ['line']" in problems


def test_check_flags_a_legend_on_the_data():
    figure, ax = plt.subplots()
    ax.plot([0, 1], [0, 1], label="line")
    ax.set_title("t"), ax.set_xlabel("x"), ax.set_ylabel("y")
    ax.legend(loc="center")
    assert readability_problems(figure) == ["a legend overlaps an axes that shows data"]


def test_check_flags_a_legend_cut_off_by_the_figure_edge():
    figure, ax = plt.subplots()
    ax.plot([0, 1], [0, 1], label="line")
    ax.set_title("t"), ax.set_xlabel("x"), ax.set_ylabel("y")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1))  # no tight_layout: it hangs off the edge
    assert readability_problems(figure) == ["a legend reaches outside the figure"]


# ----------------------------------------------------------------------------- training curves


def _history(epochs: int, valid: bool = True) -> list[dict]:
    rows = [{"epoch": e, "train_elbo": -100.0 + e} for e in range(1, epochs + 1)]
    if valid:
        for row in rows:
            row["valid_elbo"] = row["train_elbo"] - 2.0
    return rows


def _visible_ticks(ax) -> list[float]:
    low, high = sorted(ax.get_xlim())
    return [tick for tick in ax.get_xticks() if low <= tick <= high]


@pytest.mark.parametrize("epochs", [2, 3, 7])
def test_training_curves_are_readable_with_whole_epoch_ticks(epochs):
    figure = plots.training_curves(_history(epochs))
    assert_readable(figure)
    ax = figure.axes[0]
    assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == "ELBO (nats per point)"
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["train", "validation"]
    ticks = _visible_ticks(ax)
    assert len(ticks) >= 2 and all(tick == int(tick) for tick in ticks)
    assert [line.get_xdata().tolist() for line in ax.lines] == [list(range(1, epochs + 1))] * 2


def test_training_curves_without_validation_name_only_the_train_line():
    figure = plots.training_curves(_history(4, valid=False))
    assert_readable(figure)
    assert [text.get_text() for text in figure.axes[0].get_legend().get_texts()] == ["train"]


# ----------------------------------------------------------------------------- 1-D regression


def _band_inputs():
    x_train = torch.rand(12) * 2 - 1
    x_grid = torch.linspace(-2, 2, 40)
    return (x_train, torch.sin(3 * x_train), x_grid, torch.sin(3 * x_grid),
            0.1 + 0.2 * x_grid.abs(), 0.3 + 0.2 * x_grid.abs())


def test_predictive_band_is_a_readable_figure_naming_data_mean_and_both_bands():
    figure = plots.predictive_band(*_band_inputs(), title="mean field", x_label="x (scaled)",
                                   y_label="y (scaled)")
    assert isinstance(figure, Figure)
    assert_readable(figure)
    ax = figure.axes[0]
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("mean field", "x (scaled)", "y (scaled)")
    assert [text.get_text() for text in ax.get_legend().get_texts()] == [
        "±2 sd total (function + noise)", "±2 sd epistemic (function)", "predictive mean", "training data"]
    assert len(ax.collections[2].get_offsets()) == 12


def test_predictive_band_defaults_label_the_axes_x_and_y():
    figure = plots.predictive_band(*_band_inputs())
    assert_readable(figure)
    ax = figure.axes[0]
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("posterior predictive", "x", "y")


def test_regression_band_still_draws_on_a_given_axes_with_labelled_artists():
    figure, ax = plt.subplots()
    assert plots.regression_band(ax, *_band_inputs(), "panel") is ax
    assert all(_is_public(artist.get_label()) for artist in _drawn_artists(ax))
    assert ax.get_legend() is None  # a grid of panels shares one legend; the caller places it


# ----------------------------------------------------------------------------- reliability


def _classifier_outputs(n: int = 200, classes: int = 4):
    return torch.softmax(2 * torch.randn(n, classes), -1), torch.randint(0, classes, (n,))


@pytest.mark.parametrize("methods, size", [(1, 3.2), (3, 2.3)])
def test_reliability_diagram_is_wide_enough_with_the_legend_off_the_bars(methods, size):
    results = {f"method {m}": _classifier_outputs() for m in range(methods)}
    figure = plots.reliability_diagram(results, bins=10, size=size)
    assert_readable(figure)
    assert figure.get_size_inches()[0] * 100 >= 600  # pixels at the CLI's dpi=100
    assert all(ax.get_xlabel() == "confidence" for ax in figure.axes)
    assert figure.axes[0].get_ylabel() == "accuracy"
    assert figure.get_suptitle() == "reliability: 10 equal-width confidence bins"
    legend_texts = [text.get_text() for text in figure.axes[-1].get_legend().get_texts()]
    assert sorted(legend_texts) == ["accuracy in bin", "gap to mean confidence", "perfect calibration"]


# ----------------------------------------------------------------------------- latent space


def _legend_texts(ax) -> list[str]:
    return [text.get_text() for text in ax.get_legend().get_texts()]


def test_latent_scatter_has_one_legend_entry_per_class_present():
    labels = torch.tensor([5, 0, 2, 2, 5, 0, 0, 2, 5, 5])  # classes 1, 3, 4 absent
    figure = plots.latent_scatter(torch.randn(10, 2), labels, "E[z | x] on the test set")
    assert_readable(figure)
    ax = figure.axes[0]
    assert len(figure.axes) == 1  # no colour bar
    assert _legend_texts(ax) == ["0", "2", "5"]
    assert ax.get_legend().get_title().get_text() == "class"
    assert [len(collection.get_offsets()) for collection in ax.collections] == [3, 3, 4]
    colours = [tuple(collection.get_facecolor()[0]) for collection in ax.collections]
    assert len(set(colours)) == 3
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("E[z_1 | x]", "E[z_2 | x]")


def test_latent_scatter_of_a_wide_site_names_its_principal_axes():
    labels = torch.arange(10).repeat(3)
    figure = plots.latent_scatter(torch.randn(30, 6), labels, site="z1")
    assert_readable(figure)
    ax = figure.axes[0]
    assert _legend_texts(ax) == [str(c) for c in range(10)]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("PC1 of E[z1 | x]", "PC2 of E[z1 | x]")


def test_latent_scatter_of_many_classes_falls_back_to_a_colour_bar():
    figure = plots.latent_scatter(torch.randn(40, 2), torch.arange(20).repeat(2))
    assert_readable(figure)
    assert figure.axes[0].get_legend() is None
    assert [ax.get_label() for ax in figure.axes][1] == "<colorbar>"


# ----------------------------------------------------------------------------- image figures


@pytest.fixture
def tiny_vae():
    model = VAE(64, 2, (8,), "bernoulli")
    return model, AmortizedNormal(model, (8,))


def test_reconstructions_say_what_they_show(tiny_vae):
    model, guide = tiny_vae
    figure = plots.reconstructions(model, guide, {"x": torch.rand(6, 64).round()}, (8, 8), count=4)
    assert_readable(figure)
    assert "reconstruction" in figure.get_suptitle()
    assert [ax.get_ylabel() for ax in figure.axes[::4]] == ["data", "reconstruction"]


def test_samples_say_what_they_show(tiny_vae):
    model, _ = tiny_vae
    figure = plots.samples(model, (8, 8), count=3, rows=2)
    assert_readable(figure)
    assert "z ~ p(z)" in figure.get_suptitle()
    assert len(figure.axes) == 6


def test_conditional_samples_say_what_they_show():
    model = ConditionalVAE(64, 10, 2, (8,))
    figure = plots.samples(model, (8, 8), c=torch.eye(10)[:4])
    assert_readable(figure)
    assert "z ~ p(z | c)" in figure.get_suptitle()


def test_latent_manifold_says_what_it_shows(tiny_vae):
    model, _ = tiny_vae
    figure = plots.latent_manifold(model, (8, 8), steps=5)
    assert_readable(figure)
    ax = figure.axes[0]
    assert ax.get_title() == "decoder mean E[x | z] on a 5×5 grid of N(0, 1) quantiles"
    assert ax.get_xlabel().startswith("z_1") and ax.get_ylabel().startswith("z_2")


def test_image_grid_takes_a_figure_title():
    figure = plots.image_grid([torch.rand(3, 64)], (8, 8), ["row"], title="three images")
    assert_readable(figure)
    assert figure.get_suptitle() == "three images"
