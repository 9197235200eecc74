"""Importing the user's code a study names: from the study file's folder first, with a message for each failure."""

from __future__ import annotations

import pytest

from approxtune.usercode import UserCodeError, import_callable, qualified_name


def test_imports_from_the_given_folder_first(tmp_path):
    (tmp_path / "usercode_probe_a.py").write_text(
        "class Net:\n    @staticmethod\n    def make(k=1):\n        return k * 2\n"
    )
    make = import_callable("usercode_probe_a:Net.make", "model.factory", [tmp_path])
    assert make(k=4) == 8
    assert qualified_name(qualified_name) == "approxtune.usercode:qualified_name"
    assert import_callable(qualified_name(qualified_name), "x") is qualified_name


@pytest.mark.parametrize(
    ("spec", "source", "message"),
    [
        (
            "usercode_probe_missing:make",
            None,
            r"no module named 'usercode_probe_missing' \(looked in .* and the Python",
        ),
        ("usercode_probe_b:make", "x = 1\n", r"module usercode_probe_b \(.*usercode_probe_b.py\) has no 'make'"),
        ("usercode_probe_c:x", "x = 1\n", r"model.factory = 'usercode_probe_c:x' is a int, not a callable"),
        ("usercode_probe_d:make", "import not_installed_anywhere\n", "importing usercode_probe_d failed: No module"),
        (
            "usercode_probe_e:make",
            "raise RuntimeError('boom')\n",
            r"importing usercode_probe_e failed \(RuntimeError: boom",
        ),
        ("no_colon", None, "must be 'package.module:callable'"),
    ],
)
def test_failures_name_the_setting_the_module_and_where_it_was_looked_for(tmp_path, spec, source, message):
    if source is not None:
        (tmp_path / f"{spec.split(':')[0]}.py").write_text(source)
    with pytest.raises(UserCodeError, match=message):
        import_callable(spec, "model.factory", [tmp_path])
