"""The front as data: rows, the base model's reference row, the 80-column table, and the curves' radii."""

import json

import numpy as np
import optuna
import pytest
from _fronts import FP32_SIZE, INPUTS, add_trial, config, empty_study, front_study, recorded
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from rich.console import Console

from approxtune import report, search, trials


def test_front_rows_are_the_feasible_front_with_exact_values_and_confidence():
    study = front_study(infeasible=True)
    rows = report.front_rows(study)
    assert [r["trial"] for r in rows] == [0, 1, 5, 2, 3], "by decreasing ACR; dominated and infeasible left out"
    for row in rows:
        trial = study.trials[row["trial"]]
        assert (row["acr"], row["accuracy"], row["size_bytes"]) == tuple(trial.values)
        assert row["size_ratio"] == trial.values[2] / FP32_SIZE and row["confidence"] == 0.998


def test_the_base_row_comes_from_the_study_records():
    base = report.base_row(front_study())
    assert (base["acr"], base["accuracy"], base["size_bytes"], base["size_ratio"]) == (0.45, 0.95, FP32_SIZE, 1.0)
    assert base["confidence"] == pytest.approx(0.999) and base["n"] == 10_000
    assert report.base_row(optuna.create_study(directions=list(search.DIRECTIONS))) is None


def test_layer_codes_are_one_token_per_layer():
    cfg = config("int8", "int4/0.2", "fp16", "bf16").to_dict()
    assert report.layer_code(cfg) == "i8 i4p20 f16 b16"
    assert report.layer_code(config("fp32", "int4/0.05", "fp32", "fp32").to_dict()) == "f32 i4p5 f32 f32"
    assert report.layer_code(cfg, baseline="int8") == "all int8 (baseline)"
    assert "conv1 conv2 fc1 fc2" in report.layer_legend(cfg)


def _render(table, width=80):
    console = Console(width=width, record=True, color_system=None)
    console.print(table)
    return console.export_text().splitlines()


def test_the_front_table_fits_80_columns_with_g_first_and_a_confidence_column():
    study = front_study()
    lines = _render(report.front_table(study))
    assert all(len(line) <= 80 for line in lines)
    header = next(line for line in lines if "trial" in line)
    assert [c.strip() for c in header[1:-1].split("┃")] == [
        "trial",
        "ACR",
        "acc.",
        "bytes",
        "size",
        "conf.",
        "layers",
    ]
    cells = [[c.strip() for c in line[1:-1].split("│")] for line in lines if line.startswith("│")]
    rows = [c for c in cells if c[0]]  # a row's first line (continuation lines have an empty trial cell)
    assert rows[0][:6] == ["g", "0.4500", "0.9500", "100,000", "100%", "0.999"]
    assert rows[0][6].startswith("base model, reference")
    assert [r[0] for r in rows[1:]] == ["0", "1", "5", "2", "3"]
    assert rows[1][5] == "0.998" and rows[1][6] == "all fp32 (baseline)"
    # A layer code wraps between layers only: every token of trial 3's code is whole on some line.
    trial3 = [c[6] for c in cells[cells.index(rows[5]) :]]
    assert set(" ".join(trial3).split()) >= set(report.layer_code(study.trials[3].user_attrs["config"]).split())
    assert report.front_table(empty_study()) is None

    # A repeated configuration (the same values, same_as) is on the front once, as the trial it repeats.
    add_trial(study, 0.30, 0.90, 9_000, config("int4/0.3", "int4/0.5", "int4/0.5", "int8"), same_as=3)
    cells = [[c.strip() for c in line[1:-1].split("│")] for line in _render(report.front_table(study))]
    assert "6" not in [c[0] for c in cells if len(c) == 7] and "3" in [c[0] for c in cells if len(c) == 7]


def test_default_curve_trials_are_fp32_and_front_trials_spread_over_size():
    study = front_study()
    assert report.default_curve_trials(study) == [3, 5, 1, 0], "smallest, middle, largest front trial; fp32"
    assert report.default_curve_trials(study, count=1) == [3, 0]
    assert report.default_curve_trials(empty_study()) == []


def test_parse_trials():
    assert report.parse_trials("3, 8,3,12") == [3, 8, 12]
    with pytest.raises(ValueError, match=r"--trials takes trial numbers .* got 'x'"):
        report.parse_trials("3,x")


def test_curves_use_the_stored_radii_and_refuse_trials_without_them():
    study = front_study()
    base = np.linspace(0, 1, INPUTS)
    curves, notes = report.curves(study, [2, 0], base, None)
    assert [c.trial for c in curves] == [None, 2, 0] and notes == []
    assert curves[0].confidence == pytest.approx(0.999) and curves[0].label.startswith("base model g")
    assert np.array_equal(curves[1].radii, trials.trial_radii(study.trials[2]))
    assert curves[1].acr == study.trials[2].values[0] and curves[1].confidence == 0.998
    assert curves[1].label == "trial 2 (i8 i4p20 i4p50 f16), 15.0% of fp32"
    assert [c.trial for c in report.curves(study, [1], None, None)[0]] == [1], "g left out without its radii"

    with pytest.raises(ValueError, match="has no trial 99"):
        report.curves(study, [99], base, None)
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, user_attrs={"stopped": "x"}))
    with pytest.raises(ValueError, match="trial 6 is PRUNED, only a complete trial has a certificate"):
        report.curves(study, [6], base, None)
    study.add_trial(optuna.trial.create_trial(values=[0.1, 0.5, 10], user_attrs={"confidence": 0.998}))
    with pytest.raises(ValueError, match="trial 7 has no stored radii"):
        report.curves(study, [7], base, None)


def test_an_exported_trials_held_out_curve_is_read_from_its_certificate(tmp_path):
    study = empty_study()
    store_dir = tmp_path / "artifacts"
    store_dir.mkdir()
    held = [0.0, 0.3, 0.6, 0.9]
    certificate = tmp_path / "certificate.json"
    runtimes = [{"runtime": name, "per_input": [{"radius": r} for r in held]} for name in ("onnxruntime", "torch")]
    certificate.write_text(json.dumps({"method": "irs", "confidence": 0.997, "certificates": runtimes}))
    values, attrs, record = recorded(study, 0.35, 0.9, 20_000, config("int8", "int8", "int8", "int8"))
    trial = study.ask()  # artifacts attached to the running trial here (export links them to a finished one)
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    trial.storage.set_trial_system_attr(trial._trial_id, trials.RESULT_ATTR, record)
    store = FileSystemArtifactStore(str(store_dir))
    upload_artifact(artifact_store=store, file_path=str(certificate), study_or_trial=trial)
    study.tell(trial, list(values))

    curves, notes = report.curves(study, [0], None, store_dir)
    assert notes == [] and [(c.trial, c.split) for c in curves] == [(0, "search"), (0, "report"), (0, "report")]
    assert np.array_equal(curves[1].radii, held) and curves[1].confidence == 0.997
    assert [c.label for c in curves[1:]] == [
        "trial 0 held out (onnxruntime, irs, 4 report inputs, fresh noise)",
        "trial 0 held out (torch, irs, 4 report inputs, fresh noise)",
    ]
    curves, notes = report.curves(study, [0], None, tmp_path / "elsewhere")
    assert len(curves) == 1 and notes == [
        f"trial 0 was exported, but its certificate is not in the artifact store {tmp_path / 'elsewhere'}"
    ]
