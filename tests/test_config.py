"""Study files: defaults, the bundled studies, and a clear error for each kind of bad input."""

from pathlib import Path

import pytest

from approxtune.config import ConfigError, load_study

STUDIES = sorted((Path(__file__).parent.parent / "studies").glob("*.toml"))


def write(tmp_path, text):
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


def test_defaults(tmp_path):
    study = load_study(write(tmp_path, ""))
    assert study.name == "s" and study.output_dir == Path("runs/s")
    assert study.storage == "sqlite:///runs/s/study.db"
    assert study.checkpoint == Path("runs/s/model.pt")
    assert study.irs_settings.total_alpha(study.certify.alpha) == pytest.approx(0.002)
    assert study.search.race == [0.125, 0.25, 0.5]


def test_cache_paths_differ_in_every_setting_the_cache_depends_on(tmp_path):
    def paths(text):
        study = load_study(write(tmp_path, text))
        return study.cache_path("search"), study.cache_path("report")

    search, report = paths("")
    assert search.parent == Path("runs/s") and search.name.startswith("base-search-sigma0.5-n10000-")
    assert report.name.startswith("base-report-sigma0.5-n10000-") and search.suffix == report.suffix == ".cache"
    for text in (
        "[certify]\nn0 = 32",
        "[certify]\nalpha = 0.01",
        "[certify]\nsigma = 0.25",
        "[certify]\nn = 1000",
        "[study]\nseed = 1",
        "[data]\nsplit_seed = 1",
        "[data]\nreport_inputs = 100",  # a real dataset's search inputs follow its report inputs
        "[data]\ndataset = 'cifar10'\nroot = 'x'",
    ):
        other_search, other_report = paths(text)
        assert other_search != search and other_report != report, text
    other_search, other_report = paths("[data]\nsearch_inputs = 100")
    assert other_search != search and other_report == report, "the report inputs do not depend on the search count"
    assert paths("[irs]\nn_p = 100\n[search]\ntrials = 5\n[certify]\nbatch_size = 64") == (search, report)


def test_guided_sampler_and_its_samples(tmp_path):
    study = load_study(write(tmp_path, "[search]\nsampler = 'guided'\nguide_samples = 64"))
    assert (study.search.sampler, study.search.guide_samples) == ("guided", 64)
    assert load_study(write(tmp_path, "")).search.guide_samples == 8


def test_tail_mode_keys_reach_the_irs_settings(tmp_path):
    text = "[irs]\nmode = 'tail'\nn_tail = 1500\nn_p = 300\npilot = 16\nallocate = false\nblock = 8"
    settings = load_study(write(tmp_path, text)).irs_settings
    assert (settings.mode, settings.n_tail, settings.pilot, settings.allocate, settings.block) == (
        "tail",
        1500,
        16,
        False,
        8,
    )
    assert settings.tail_length(2000) == 1500
    assert (
        load_study(write(tmp_path, "[irs]\nmode = 'tail'")).irs_settings.tail_length(2000) == 1000
    )  # n_tail = 0: n // 2


@pytest.mark.parametrize("path", STUDIES, ids=[p.name for p in STUDIES])
def test_bundled_studies_load(path):
    study = load_study(path)
    assert study.irs.n_p <= study.certify.n


def test_digits_variants_differ_only_in_sigma():
    sigmas = {load_study(p).certify.sigma for p in STUDIES if p.stem.startswith("digits")}
    assert sigmas == {0.25, 0.5, 1.0}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[certify\nsigma = 1", "is not valid TOML"),
        ("[certfy]\nsigma = 1", r"unknown section \[certfy\]; did you mean \[certify\]"),
        ("[certify]\nsigm = 1", "unknown key certify.sigm; did you mean 'sigma'"),
        ("[certify]\nsigma = 'big'", "certify.sigma must be a number, got 'big'"),
        ("[certify]\nn = 1.5", "certify.n must be an integer"),
        ("[search]\nbaselines = 1", "search.baselines must be true or false"),
        ("[search]\nprecisions = 'int8'", "search.precisions must be a list"),
        ("[certify]\nsigma = 0", "certify.sigma must be positive"),
        ("[certify]\nsigma = -1", "certify.sigma must be positive"),
        ("[certify]\nalpha = 0.5", r"certify.alpha must lie in \(0, 0.5\)"),
        ("[certify]\nalpha = 0", r"certify.alpha must lie in \(0, 0.5\)"),
        ("[irs]\nn_p = 10001", r"irs.n_p must lie in \[1, certify.n = 10000\]"),
        ("[irs]\nalpha_zeta = 0.7", "irs.alpha_zeta must lie in"),
        ("[irs]\nmode = 'maximum'", "irs.mode = 'maximum' is not one of max, gamma"),
        ("[irs]\nzeta = 'losses'", "irs.zeta = 'losses' is not one of loss, disagreement, signed"),
        ("[search]\nprecisions = ['int3']", "search.precisions = 'int3' is not one of"),
        ("[search]\nprune = [1.0]", r"search.prune amounts must lie in \[0, 1\)"),
        ("[search]\nsampler = 'tpe2'", "did you mean 'tpe'"),
        ("[search.constraints]\nmax_size = 0.5", "did you mean 'max_size_ratio'"),
        ("[data]\ndataset = 'cifar10'", "data.root must name the folder"),
        ("[irs]\nn_tail = 10000", r"irs.n_tail must lie in \[0, certify.n = 10000\)"),
        ("[irs]\nblock = 0", "irs.block must be >= 1"),
        ("[irs]\nmode = 'tail'\nn_p = 6000", "n_p = 6000 reaches into the tail"),
        ("[irs]\nmode = 'tail'\npilot = 400", "pilot = 400 must be below n_p = 400"),
        ("[search]\nrace = [0.5, 0.25]", "search.race must list increasing fractions"),
        ("[search]\nrace = [1.0]", "search.race must list increasing fractions"),
        ("[search]\nprune = [0.0, 0.1, 0.1]", r"search.prune lists a value twice \(\[0.0, 0.1, 0.1\]\): list each"),
        ("[search]\nprecisions = ['int8', 'int8']", r"search.precisions lists a value twice \(\['int8', 'int8'\]\)"),
        ("[search]\nguide_samples = 0", r"search.guide_samples must lie in \[1, certify.n = 10000\], got 0"),
        ("[search]\nguide_samples = 10001", r"search.guide_samples must lie in \[1, certify.n = 10000\], got 10001"),
        ("[certify]\nsigma = inf", r"certify.sigma must be a finite number, got inf"),
        ("[irs]\ngamma = nan", r"irs.gamma must be a finite number, got nan"),
        ("[study]\nseed = -1", r"study.seed must lie in \[0, 2\*\*32 - 1\]"),
        ("[study]\nseed = 4294967296", r"study.seed must lie in \[0, 2\*\*32 - 1\]"),
        ("[data]\nsplit_seed = -1", "data.split_seed must be non-negative"),
        ("[certify]\nsigma = 3e37", r"certify.sigma must be positive and at most 2e\+37 \(the noise sigma \* eps is"),
        ("[train]\nlr = 3.0", r"train.lr must be at most 1 \(Adam's step size; the default is 0.003\), got 3.0"),
        ("[irs]\nblock = 10001", r"irs.block must be at most certify.n = 10000 \(a step of samples\)"),
        (
            "[model]\ntorchvision = 'resnet18'\nnum_classes = 4294967297",
            r"model.num_classes must lie in \[1, 2\*\*32\] \(or 0: the default; the cache stores classes as 32-bit",
        ),
        ("[model]\ntorchvision = 'resnet18'\nnum_classes = -1", r"model.num_classes must lie in \[1, 2\*\*32\]"),
        ("[model]\narch = 'digits-cnn'\ntorchvision = 'resnet18'", "name the model one way only"),
        ("[model]\nfactory = 'mymodels.make'", "model.factory = 'mymodels.make' must be 'package.module:callable'"),
        ("[model.kwargs]\nwidth = 3", r"\[model.kwargs\] are the factory's arguments: set model.factory too"),
        ("[model]\nnum_classes = 10", "model.num_classes apply to torchvision models only"),
        ("[model]\ntorchvision = 'resnet18'\nmean = [0.5]\nstd = [0.2, 0.2]", "need one value per channel"),
        ("[model]\ntorchvision = 'resnet18'\nmean = [0.5]\nstd = [0.0]", "need one value per channel, std > 0"),
        ("[model]\nkwargs = 3", "model.kwargs must be a table of named values"),
        ("[data]\nloader = 'mydata:load'", 'data.loader and \\[data.kwargs\\] need data.dataset = "python"'),
        ("[data]\ndataset = 'python'\nloader = 'mydata'", "data.loader = 'mydata' must be 'package.module:callable'"),
    ],
)
def test_bad_input(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_study(write(tmp_path, text))
    assert str(tmp_path / "s.toml") in str(info.value), "the message names the file"


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_study(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="is a directory; give a study file"):
        load_study(tmp_path)


def test_user_model_and_data_keys(tmp_path):
    text = (
        "[model]\nfactory = 'mymodels:make'\n[model.kwargs]\nwidth = 3\nname = 'x'\n"
        "[data]\ndataset = 'python'\nloader = 'mydata:load'\n[data.kwargs]\nrows = 10"
    )
    study = load_study(write(tmp_path, text))
    assert (study.model.kind, study.model.kwargs, study.data.kwargs) == (
        "factory",
        {"width": 3, "name": "x"},
        {"rows": 10},
    )
    assert load_study(write(tmp_path, "")).model.builtin_arch == "digits-cnn"
    other = load_study(write(tmp_path, text.replace("rows = 10", "rows = 11")))
    assert other.cache_path("search") != study.cache_path("search"), "the loader's arguments are part of the cache key"


def test_keywords_cover_every_key_once():
    from approxtune.config import SECTIONS, keyword_table

    table = keyword_table()
    assert table["sigma"] == ("certify", "sigma") and table["max_size_ratio"] == ("search", "max_size_ratio")
    assert "batch_size" not in table and table["train_batch_size"] == ("train", "batch_size")
    assert table["certify_batch_size"] == ("certify", "batch_size") and table["model_kwargs"] == ("model", "kwargs")
    every = {(section, f) for section, cls in SECTIONS.items() for f in cls.__dataclass_fields__ if f != "constraints"}
    assert every <= set(table.values())
