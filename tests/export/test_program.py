"""model.pt2: an ExportedProgram that holds the compressed weights, decodes them exactly, agrees with f^p on the
replayed noise samples, and loads -- like model.onnx -- in a process in which approxtune cannot be imported."""

import json
import site
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import torch
from _exports import CONFIGS, config_named

from approxtune.approximation import apply_approximation, compress_model
from approxtune.export.program import CompressedModel
from approxtune.export.runtimes import RUNTIMES, load_deployable

WITHOUT_APPROXTUNE = """
import importlib.util, json, sys
sys.path += json.loads(sys.argv[3])  # the standard library and site-packages only: no checkout, no .pth finders
assert importlib.util.find_spec("approxtune") is None, "approxtune must not be importable here"
try:
    import approxtune
except ImportError:
    pass
else:
    raise AssertionError("approxtune was imported")
import numpy as np, onnxruntime, torch
torch.set_num_threads(1)
names, root = json.loads(sys.argv[1]), sys.argv[2]
batches = torch.from_numpy(np.load(f"{root}/batches.npy"))
sizes = np.load(f"{root}/sizes.npy").tolist()
options = onnxruntime.SessionOptions()
options.intra_op_num_threads = 1
for name in names:
    program = torch.export.load(f"{root}/{name}/model.pt2").module()
    session = onnxruntime.InferenceSession(f"{root}/{name}/model.onnx", options, providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        pt2 = [program(x).argmax(1).numpy() for x in torch.split(batches, sizes)]
    ort = [session.run(None, {"input": x.numpy()})[0].argmax(1) for x in torch.split(batches, sizes)]
    np.save(f"{root}/{name}.pt2-classes.npy", np.concatenate(pt2))
    np.save(f"{root}/{name}.onnx-classes.npy", np.concatenate(ort))
assert not any(m == "approxtune" or m.startswith("approxtune.") for m in sys.modules)
"""


@pytest.fixture(scope="module")
def elsewhere(exact, tmp_path_factory):
    """Both deployables of every config run on the replayed samples by ``python -I -S`` in a temporary directory."""
    np.save(exact.out / "batches.npy", exact.batches.numpy())
    np.save(exact.out / "sizes.npy", np.array(exact.sizes))
    paths = json.dumps([*site.getsitepackages(), site.getusersitepackages()])
    script = textwrap.dedent(WITHOUT_APPROXTUNE)
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script, json.dumps([*CONFIGS]), str(exact.out), paths],
        cwd=tmp_path_factory.mktemp("elsewhere"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {
        (name, kind): np.load(exact.out / f"{name}.{kind}-classes.npy") for name in CONFIGS for kind in ("pt2", "onnx")
    }


@pytest.mark.parametrize("name", list(CONFIGS))
def test_both_deployables_run_without_approxtune_and_predict_like_in_their_runtime_here(exact, elsewhere, name):
    for runtime, kind in (("torch", "pt2"), ("onnxruntime", "onnx")):
        deployable = load_deployable(RUNTIMES[runtime], exact.out / name)
        here = torch.cat([deployable(x).argmax(1) for x in torch.split(exact.batches, exact.sizes)]).numpy()
        assert np.array_equal(elsewhere[name, kind], here), f"{kind}: the same runtime, the same function"
        agreement = (here == exact.logits[name].argmax(1).numpy()).mean()
        assert agreement >= 0.99, f"{kind} predicts f^p's class on {agreement:.2%} of the samples"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_program_decodes_exactly_the_weights_of_f_p_and_agrees_with_it(exact, name):
    config = config_named(name)
    approx = apply_approximation(exact.base, config)
    compressed = CompressedModel(exact.base, compress_model(exact.base, config))
    state = approx.state_dict()
    for key, layer in zip(compressed.keys, compressed.layers, strict=True):
        assert torch.equal(layer(), state[key]), key
    deployable = load_deployable(RUNTIMES["torch"], exact.out / name)
    logits = torch.cat([deployable(x) for x in torch.split(exact.batches, exact.sizes)])
    expected = exact.logits[name]
    assert (logits.argmax(1) == expected.argmax(1)).float().mean() >= 0.99
    assert (logits - expected).abs().max() < 1e-3 * (1 + expected.abs().max())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_program_file_holds_the_compressed_weights_and_a_small_graph(exact, name):
    size = exact.results[name].size_bytes
    path = exact.out / name / "model.pt2"
    pt2_bytes = path.stat().st_size
    assert pt2_bytes == exact.results[name].deployable_bytes["model.pt2"]
    assert size <= pt2_bytes <= 1.1 * size + 16384, f"{pt2_bytes} bytes for a {size}-byte model"
    with zipfile.ZipFile(path) as archive:
        weights = [i for i in archive.infolist() if "/data/weights/weight_" in i.filename]
        stored = sum(i.file_size for i in weights)
        assert all(i.compress_type == zipfile.ZIP_STORED for i in weights)
        graph = b"".join(archive.read(i) for i in archive.infolist() if i.filename.endswith(".json"))
        assert b"stack_trace" not in graph
    packed = compress_model(exact.base, config_named(name))
    nothing_kept = sum(a["mask"].nbytes for a in packed.values() if "mask" in a and not np.unpackbits(a["mask"]).any())
    assert stored == size - nothing_kept, "the packed arrays and the other float32 tensors (a fully pruned layer: none)"


def test_the_program_takes_any_batch_size(exact):
    program = torch.export.load(exact.out / "sparse" / "model.pt2").module()
    with torch.inference_mode():
        for batch in (1, 37):
            assert program(torch.zeros(batch, 1, 8, 8)).shape == (batch, 10)
