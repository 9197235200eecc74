"""The figures: front points labelled with their trial numbers, g's reference line, infeasible markers only when
there are any, the confidence in the caption; the hover texts of front.html; certified-accuracy curves."""

import numpy as np
import pytest
from _fronts import FP32_SIZE, INPUTS, add_trial, config, empty_study, front_study
from matplotlib.backends.backend_agg import FigureCanvasAgg

from approxtune import plots, report, trials

PNG = b"\x89PNG\r\n\x1a\n"


def _labels(fig):
    ax = fig.axes[0]
    return {text.get_text(): text for text in ax.texts}


def test_every_front_point_is_labelled_with_its_trial_number_at_its_position():
    study = front_study()
    other = config("int4/0.3", "int4/0.5", "int4/0.3", "int8")
    add_trial(study, 0.30, 0.90, 9_000, other, radii_of=3)  # another configuration at trial 3's point
    add_trial(study, 0.30, 0.90, 9_000, config("int4/0.3", "int4/0.5", "int4/0.5", "int8"), same_as=3)  # a repeat of 3
    fig = plots.front_figure(study)
    labels = _labels(fig)
    front = trials.front(study)
    assert {"0 fp32", "1 int8", "2", "3", "5", "6"} == set(labels), "front trials (with baseline names) only"
    assert 7 not in {t.number for t in front}, "a repeated configuration is on the front once, as its first trial"
    for trial in front:
        name = trial.user_attrs.get("baseline")
        label = labels[f"{trial.number} {name}" if name else str(trial.number)]
        assert label.xy == pytest.approx((trial.values[2] / FP32_SIZE, trial.values[0]))
        assert label.get_color() == "black"
    # No two labels overlap (they are placed around their points).
    renderer = FigureCanvasAgg(fig).get_renderer()
    boxes = [text.get_window_extent(renderer) for text in labels.values()]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def test_a_baseline_off_the_front_is_labelled_in_grey():
    study = front_study()
    add_trial(study, 0.10, 0.80, 50_000, config("fp16", "fp16", "fp16", "fp16"), baseline="fp16")
    labels = _labels(plots.front_figure(study))
    assert labels["6 fp16"].get_color() == "grey" and labels["6 fp16"].xy == pytest.approx((0.5, 0.1))


def test_the_base_models_acr_is_a_reference_line_and_the_caption_states_the_confidence():
    fig = plots.front_figure(front_study())
    ax = fig.axes[0]
    line = next(line for line in ax.get_lines() if line.get_label().startswith("base model g"))
    assert tuple(line.get_ydata()) == (0.45, 0.45)
    assert line.get_label() == "base model g: ACR 0.4500 (Cohen, n = 10000)"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["Pareto front (trial number)", "base model g: ACR 0.4500 (Cohen, n = 10000)"]
    caption = " ".join(t.get_text() for t in fig.texts)
    assert "holds with probability ≥ 0.998" in caption and "g's (Cohen) with ≥ 0.999" in caption
    assert f"{INPUTS} search inputs" in caption


def test_infeasible_trials_are_marked_and_in_the_legend_only_when_there_are_any():
    fig = plots.front_figure(front_study(infeasible=True))
    ax = fig.axes[0]
    assert "infeasible (search.constraints)" in [t.get_text() for t in ax.get_legend().get_texts()]
    crosses = [c for c in ax.collections if c.get_offsets().shape[0] == 1]
    assert [tuple(c.get_offsets()[0]) for c in crosses] == [pytest.approx((0.2, 0.41))]
    assert "6" not in _labels(fig), "an infeasible trial is not on the front"


def test_plot_front_and_the_html_are_written(tmp_path):
    study = front_study()
    png, html = plots.write_front(study, tmp_path)
    assert (png.name, html.name) == trials.FRONT_FILES
    assert png.read_bytes().startswith(PNG)
    text = html.read_text()
    assert '<div id="front"' in text and "Plotly.newPlot" in text
    assert '<script src="http' not in text and len(text) > 1_000_000, "plotly.js inside: it works offline"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["front.digest", "front.html", "front.png"], "no temporary file left"
    first = html.read_bytes()
    plots.front_html(study, html)
    assert html.read_bytes() == first, "the same study writes the same bytes"


def test_hovering_a_point_shows_its_trial_layers_acr_accuracy_and_size():
    study = front_study(infeasible=True)
    fig = plots.front_plotly(study)
    trials, infeasible = fig.data
    assert list(trials.text) == ["0", "1", "2", "3", "", "5"], "front points labelled with their number"
    hover = trials.hovertext[2]
    for part in ("<b>trial 2</b>", "ACR 0.3600", "accuracy 0.9300", "size 15,000 bytes (15.0% of fp32)", "≥ 0.998"):
        assert part in hover
    assert "conv2: int4, 20% pruned" in hover and "fc2: fp16" in hover
    assert "<b>trial 0 (baseline fp32)</b>" in trials.hovertext[0]
    assert infeasible.name == "infeasible (search.constraints)" and "<i>infeasible</i>" in infeasible.hovertext[0]
    assert fig.layout.shapes[0].y0 == 0.45, "g's ACR as a reference line"
    assert len(plots.front_plotly(front_study()).data) == 1, "no infeasible trace without infeasible trials"


def test_certified_accuracy_curves_show_each_radius_share(tmp_path):
    study = front_study()
    base = np.linspace(0.0, 1.2, INPUTS)
    curves, _ = report.curves(study, [2, 0], base, None)
    held = report.Curve("trial 2 held out", np.array([0.0, 0.2, 0.4, 0.8]), 2, "report", 0.997)
    fig = plots.curves_figure([*curves, held], "synthetic")
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == [
        f"{c.label}: ACR {c.acr:.4f}, holds w.p. ≥ {c.confidence:.4g}" for c in [*curves, held]
    ]
    for curve, line in zip([*curves, held], lines, strict=True):
        r, accuracy = line.get_data()
        expected = [np.mean((curve.radii > 0) & (curve.radii >= x)) for x in r]
        assert np.allclose(accuracy, expected)
    assert lines[0].get_color() == "black" and lines[3].get_linestyle() == "--"
    assert lines[1].get_color() == lines[3].get_color(), "a held-out curve has its trial's colour"
    caption = " ".join(t.get_text() for t in fig.texts)
    assert f"the {INPUTS} search inputs" in caption and "4 report inputs" in caption
    assert "report" not in " ".join(t.get_text() for t in plots.curves_figure(curves, "x").texts)
    path = plots.plot_curves(curves, tmp_path / "curves.png", "synthetic")
    assert path.read_bytes().startswith(PNG)


def test_an_empty_study_still_plots():
    assert len(plots.front_figure(empty_study()).axes[0].texts) == 0


def test_front_plots_are_drawn_again_only_when_the_study_changed(tmp_path):
    study = front_study()
    png, html = plots.write_front(study, tmp_path)
    stamps = [png.stat().st_mtime_ns, html.stat().st_mtime_ns]
    assert plots.write_front(study, tmp_path) == [png, html]
    assert [png.stat().st_mtime_ns, html.stat().st_mtime_ns] == stamps, "unchanged study: nothing redrawn"
    add_trial(study, 0.2, 0.99, 40_000, config("fp16", "fp16", "fp16", "fp16"))
    plots.write_front(study, tmp_path)
    assert png.stat().st_mtime_ns != stamps[0] and html.stat().st_mtime_ns != stamps[1], "a new trial: redrawn"
    (tmp_path / "front.png").unlink()
    plots.write_front(study, tmp_path)
    assert (tmp_path / "front.png").is_file(), "a missing plot is drawn again"
