"""The README's Python example runs as written (in a fresh folder), and its result reloads."""

from __future__ import annotations

import copy
import re
import runpy
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example(section: str) -> str:
    """The first ```python block under the README heading ``section``."""
    text = README.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", body, re.DOTALL)
    assert match, f"no python example under '## {section}'"
    return match.group(1)


@pytest.mark.slow
def test_use_your_own_model_example_runs_as_written(tmp_path, monkeypatch, capsys):
    import approxtune

    (tmp_path / "example.py").write_text(python_example("Use your own model"))
    monkeypatch.chdir(tmp_path)
    namespace = runpy.run_path(str(tmp_path / "example.py"), run_name="__main__")
    result, export = namespace["result"], namespace["export"]
    assert result.front and export.certificate["confidence"] > 0.99 and len(export.certificate["certificates"]) == 2
    directory = tmp_path / "exported" / "my-mlp"
    with pytest.raises(approxtune.ApproxtuneError, match=r"load_model\(DIR, model=YourNet"):
        approxtune.load_model(directory)  # an nn.Sequential is not rebuilt without its layers
    rebuilt = approxtune.load_model(directory, model=copy.deepcopy(namespace["model"]))
    x = namespace["x"][:50]
    assert torch.equal(rebuilt(x), export.model(x))
    printed = capsys.readouterr().out
    assert re.search(r"^\d+ ACR 0\.\d{3} accuracy 0\.\d{3} \d+% of fp32$", printed, re.MULTILINE), printed
