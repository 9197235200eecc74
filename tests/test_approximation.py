"""Per-layer approximations: quantization error bounds, exact pruning counts, packing and the size formula."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from approxtune.approximation import (
    PRECISIONS,
    PRESETS,
    ApproximationConfig,
    ApproximationError,
    LayerChoice,
    _pack_int4,
    _unpack_int4,
    apply_approximation,
    compress_layer,
    compress_model,
    compressible_layers,
    decompress_layer,
    fp32_size_bytes,
    global_l1_masks,
    l1_mask,
    model_size_bytes,
    preset,
    pruning_masks,
    size_ratio,
)
from approxtune.models import build_model

DIGITS_LAYERS = ["conv1", "conv2", "fc1", "fc2"]


def digits(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("digits-cnn").eval()


def bn_net(seed: int = 0) -> nn.Module:
    """Nested layers, a BatchNorm with non-trivial running stats, and bias-free convolutions."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 5, 3, bias=False), nn.ReLU()),
        nn.Flatten(),
        nn.Linear(5 * 6 * 6, 3),
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
        net[1].weight.uniform_(0.5, 2)
    return net.eval()


def uniform(model: nn.Module, precision: str = "fp32", prune: float = 0.0) -> ApproximationConfig:
    return ApproximationConfig(dict.fromkeys(compressible_layers(model), LayerChoice(precision, prune)))


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: model.get_submodule(name).weight.detach() for name in compressible_layers(model)}


# ---------------------------------------------------------------------------------------------- layer selection


def test_compressible_layers_in_module_order_with_patterns():
    model = digits()
    assert compressible_layers(model) == DIGITS_LAYERS
    assert compressible_layers(model, include=["conv*"]) == ["conv1", "conv2"]
    assert compressible_layers(model, exclude=["fc2"]) == ["conv1", "conv2", "fc1"]
    assert compressible_layers(model, include=["*1"], exclude=["fc*"]) == ["conv1"]
    assert compressible_layers(bn_net()) == ["0", "3.0", "5"]
    assert compressible_layers(bn_net(), include=["3.*"]) == ["3.0"]


@pytest.mark.parametrize("kind", ["include", "exclude"])
def test_pattern_matching_nothing_names_pattern_and_layers(kind):
    with pytest.raises(ApproximationError, match=r"'layer\*' matches no compressible layer") as info:
        compressible_layers(digits(), **{kind: ["conv1", "layer*"]})
    assert kind in str(info.value)
    assert all(repr(name) in str(info.value) for name in DIGITS_LAYERS)


# ------------------------------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_integer_quantization_moves_each_weight_at_most_half_a_step(precision):
    model = digits()
    approx = apply_approximation(model, uniform(model, precision))
    qmax = {"int8": 127, "int4": 7}[precision]
    for name, w in weights(model).items():
        w_hat = approx.get_submodule(name).weight.detach()
        assert w_hat.dtype == torch.float32
        assert not torch.equal(w_hat, w), name
        scale = w.flatten(1).abs().amax(1) / qmax
        shape = (-1,) + (1,) * (w.dim() - 1)
        step = scale.reshape(shape)
        assert torch.all((w_hat - w).abs() <= step / 2 * (1 + 1e-5)), name
        codes = w_hat / step
        assert torch.allclose(codes, codes.round(), atol=1e-4), name
        assert codes.abs().max() <= qmax + 1e-4
        assert torch.allclose(codes.abs().flatten(1).amax(1), torch.full_like(scale, qmax))  # channel max is exact


@pytest.mark.parametrize(("precision", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precisions_round_to_nearest_in_their_dtype(precision, dtype):
    model = digits()
    approx = apply_approximation(model, uniform(model, precision))
    for name, w in weights(model).items():
        w_hat = approx.get_submodule(name).weight.detach()
        assert w_hat.dtype == torch.float32
        assert not torch.equal(w_hat, w), name
        assert torch.equal(w_hat, w.to(dtype).float()), name
        low = w_hat.to(dtype)
        for toward in (float("inf"), float("-inf")):  # no representable neighbour is closer: within half an ulp
            neighbour = torch.nextafter(low, torch.full_like(low, toward)).float()
            assert torch.all((w - w_hat).abs() <= (w - neighbour).abs()), name


def test_bf16_and_fp16_rounding_agree_with_torch_on_special_values():
    f32 = np.float32
    special = [0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38, 1e-40, -1e-45, 65504.0, 6e-8, 1e-3]
    halfway = (np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x3F80C000], dtype=np.uint32)).view(f32)  # ties
    rng = np.random.default_rng(5)
    values = np.concatenate([np.array(special, dtype=f32), halfway, rng.standard_normal(1000).astype(f32)])
    w = torch.from_numpy(values).reshape(-1, 1)
    packed = compress_layer(w, LayerChoice("bf16"))
    bits = w.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).reshape(-1)
    number = ~np.isnan(values)  # NaN's bit pattern is not pinned down (torch gives 0xFFFF here); it stays a NaN
    assert np.array_equal(packed["values"][number], bits[number])
    assert torch.equal(decompress_layer(packed, w.shape).isnan(), w.isnan())
    finite = w[w.abs() < 65504].reshape(-1, 1)
    fp16 = compress_layer(finite, LayerChoice("fp16"))["values"]
    assert np.array_equal(
        fp16.view(np.uint16), finite.to(torch.float16).view(torch.int16).numpy().view(np.uint16)[:, 0]
    )
    with pytest.raises(ApproximationError, match="overflow bf16"):
        compress_layer(torch.tensor([[3.4028235e38]]), LayerChoice("bf16"))


def test_all_zero_channel_gets_scale_one_and_zero_codes():
    w = torch.tensor([[0.0, 0.0, 0.0], [0.5, -1.0, 0.25]])
    packed = compress_layer(w, LayerChoice("int8"))
    assert packed["scale"].tolist() == [1.0, pytest.approx(1 / 127)]
    assert packed["values"].tolist() == [0, 0, 0, 64, -127, 32]
    assert torch.equal(decompress_layer(packed, w.shape)[0], torch.zeros(3))


def test_fp16_overflow_is_an_error():
    with pytest.raises(ApproximationError, match="overflow fp16"):
        compress_layer(torch.tensor([[1e5, 1.0]]), LayerChoice("fp16"))


# ------------------------------------------------------------------------------------------------------ pruning


@pytest.mark.parametrize("amount", [0.05, 0.1, 0.25, 0.5, 0.9])
def test_layer_pruning_zeroes_exactly_the_requested_fraction_of_smallest_weights(amount):
    model = digits()
    approx = apply_approximation(model, uniform(model, "fp32", amount))
    for name, w in weights(model).items():
        w_hat = approx.get_submodule(name).weight.detach()
        pruned = w_hat == 0
        assert int(pruned.sum()) == round(amount * w.numel()), name
        assert torch.equal(w_hat[~pruned], w[~pruned])  # fp32 keeps the rest exactly
        assert w[pruned].abs().max() <= w[~pruned].abs().min()


def test_pruned_count_uses_round_half_to_even_and_ties_break_by_position():
    w = torch.ones(2, 3)  # 6 weights, all tied
    assert int((~l1_mask(w, 0.25)).sum()) == 2  # round(1.5) = 2
    assert int((~l1_mask(w, 0.75)).sum()) == 4  # round(4.5) = 4
    assert l1_mask(w, 0.5).reshape(-1).tolist() == [False, False, False, True, True, True]


@pytest.mark.parametrize("amount", [0.1, 0.33, 0.5, 0.9, 0.99])
def test_pruning_masks_match_a_stable_sort_with_many_ties(amount):
    rng = np.random.default_rng(3)
    w = torch.from_numpy(rng.integers(-3, 4, size=(7, 11)).astype(np.float32))
    w[0, 0] = float("nan")  # sorts last
    expected = torch.ones(w.numel(), dtype=torch.bool)
    expected[torch.argsort(w.abs().reshape(-1), stable=True)[: round(amount * w.numel())]] = False
    assert torch.equal(l1_mask(w, amount).reshape(-1), expected)
    halves = {"a": w[:3], "b": w[3:]}
    masks = global_l1_masks(halves, amount)
    assert torch.equal(torch.cat([masks["a"], masks["b"]]).reshape(-1), expected)


def test_global_pruning_uses_one_threshold_and_exact_total():
    model = digits()
    config = ApproximationConfig(dict.fromkeys(DIGITS_LAYERS, LayerChoice()), global_prune=0.3)
    with torch.no_grad():
        model.fc1.weight.mul_(0.1)  # fc1's weights are smallest: global pruning must take more of them
    approx = apply_approximation(model, config)
    base, new = weights(model), weights(approx)
    total = sum(w.numel() for w in base.values())
    pruned = {name: new[name] == 0 for name in base}
    assert sum(int(p.sum()) for p in pruned.values()) == round(0.3 * total)
    largest_pruned = max(base[n][pruned[n]].abs().max() for n in base if pruned[n].any())
    smallest_kept = min(base[n][~pruned[n]].abs().min() for n in base)
    assert largest_pruned <= smallest_kept
    fractions = {n: pruned[n].float().mean().item() for n in base}
    assert fractions["fc1"] > 0.3 > fractions["conv1"]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("global_prune", [False, True])
def test_pruned_zeros_stay_zero_after_quantization(precision, global_prune):
    model = digits()
    if global_prune:
        config = ApproximationConfig(dict.fromkeys(DIGITS_LAYERS, LayerChoice(precision)), global_prune=0.4)
    else:
        config = uniform(model, precision, 0.4)
    masks = pruning_masks(model, config)
    approx = apply_approximation(model, config)
    for name, mask in masks.items():
        w_hat = approx.get_submodule(name).weight.detach()
        assert int((~mask).sum()) == round(0.4 * mask.numel()) or global_prune
        assert torch.all(w_hat[~mask] == 0), name


def test_sparse_and_dense_encodings_decode_to_the_same_weights():
    torch.manual_seed(1)
    w = torch.randn(6, 7)
    for precision in PRECISIONS:
        for amount in (0.1, 0.9):
            mask = l1_mask(w, amount)
            packed = compress_layer(w, LayerChoice(precision), mask)
            reference = compress_layer(torch.where(mask, w, 0.0), LayerChoice(precision))
            assert torch.equal(decompress_layer(packed, w.shape), decompress_layer(reference, w.shape))
            if amount == 0.9:
                assert "mask" in packed, precision  # 4 kept of 42: sparse is smaller for every precision
                assert packed["mask"].nbytes == math.ceil(42 / 8)
    assert "mask" not in compress_layer(w, LayerChoice("int4"), l1_mask(w, 0.1))  # dense is smaller here


# ------------------------------------------------------------------------------------------- model-level checks


@pytest.mark.parametrize("make", [digits, bn_net])
def test_all_fp32_unpruned_config_reproduces_the_model_bit_for_bit(make):
    model = make()
    approx = apply_approximation(model, uniform(model))
    x = torch.rand(16, 1, 8, 8)
    assert torch.equal(approx(x), model(x))
    for (key, a), (_, b) in zip(approx.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), key


def test_base_model_is_unchanged_and_no_pruning_state_is_left():
    model = bn_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = ApproximationConfig({"0": LayerChoice("int4", 0.3), "3.0": LayerChoice("bf16", 0.5)})
    approx = apply_approximation(model, config)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert list(approx.state_dict()) == list(before)  # no weight_orig / weight_mask
    for module in approx.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks
        assert not hasattr(module, "weight_mask")
    assert not torch.equal(approx[0].weight, model[0].weight)
    assert torch.equal(approx[5].weight, model[5].weight)  # a layer the config does not name is untouched
    assert torch.equal(approx[1].running_var, model[1].running_var)


def test_apply_keeps_parameter_kinds_ties_and_memory_format():
    model = digits().to(memory_format=torch.channels_last)
    model.fc1.weight.requires_grad_(False)
    tied = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    tied[2].weight = tied[0].weight
    approx = apply_approximation(model, uniform(model, "int8"))
    assert isinstance(approx.conv1.weight, nn.Parameter) and approx.conv1.weight.requires_grad
    assert not approx.fc1.weight.requires_grad
    assert approx.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(approx.conv2.weight, apply_approximation(digits(), uniform(model, "int8")).conv2.weight)
    approx_tied = apply_approximation(tied, ApproximationConfig({"0": LayerChoice("int4")}))
    assert approx_tied[2].weight is approx_tied[0].weight
    assert not torch.equal(approx_tied[0].weight, tied[0].weight)
    assert [n for n, _ in approx_tied.named_parameters()] == [n for n, _ in tied.named_parameters()]
    with pytest.raises(ApproximationError, match="layers '0' and '2' share one weight tensor"):
        ApproximationConfig({"0": LayerChoice("int4"), "2": LayerChoice("int8")}).validate(tied)


def test_apply_is_deterministic():
    model = digits()
    config = ApproximationConfig(
        {"conv1": LayerChoice("int8"), "conv2": LayerChoice("int4", 0.2), "fc1": LayerChoice("fp16", 0.5)}
    )
    a, b = apply_approximation(model, config), apply_approximation(model, config, compress_model(model, config))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


# -------------------------------------------------------------------------------------------------------- int4


@pytest.mark.parametrize("count", [0, 1, 2, 15, 16, 33])
def test_int4_pack_unpack_round_trip(count):
    rng = np.random.default_rng(count)
    q = rng.integers(-8, 8, size=count).astype(np.int8)
    packed = _pack_int4(q)
    assert packed.dtype == np.uint8 and packed.size == math.ceil(count / 2)
    assert np.array_equal(_unpack_int4(packed, count), q)


def test_int4_nibble_layout():
    assert _pack_int4(np.array([1, -1, 7], dtype=np.int8)).tolist() == [0xF1, 0x07]


def test_int4_layer_with_odd_element_count_round_trips():
    torch.manual_seed(2)
    w = torch.randn(3, 5)  # 15 weights
    packed = compress_layer(w, LayerChoice("int4"))
    assert packed["values"].nbytes == 8 and packed["scale"].dtype == np.float32
    scale = torch.from_numpy(packed["scale"])[:, None]
    expected = torch.round(w / scale).clamp(-7, 7) * scale
    assert torch.equal(decompress_layer(packed, w.shape), expected)
    with pytest.raises(ApproximationError, match="cannot hold exactly"):
        decompress_layer(packed, (3, 6))


def test_packed_dtypes():
    w = torch.randn(4, 3)
    expected = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16, "int8": np.int8, "int4": np.uint8}
    for precision, dtype in expected.items():
        assert compress_layer(w, LayerChoice(precision))["values"].dtype == dtype
    bits = compress_layer(w, LayerChoice("bf16"))["values"]
    assert np.array_equal(bits, w.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).reshape(-1))


# -------------------------------------------------------------------------------------------------------- sizes


def test_size_formula_by_hand():
    lin = nn.Linear(3, 2)
    assert fp32_size_bytes(lin) == 6 * 4 + 2 * 4
    assert model_size_bytes(lin, ApproximationConfig({"": LayerChoice("int8")})) == 6 + 2 * 4 + 2 * 4  # 22
    assert model_size_bytes(lin, ApproximationConfig({"": LayerChoice("int4")})) == 3 + 2 * 4 + 2 * 4
    assert model_size_bytes(lin, ApproximationConfig({"": LayerChoice("fp16")})) == 6 * 2 + 2 * 4
    net = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4))  # 32 weights; BN: 4 x 4 floats + num_batches_tracked
    assert fp32_size_bytes(net) == 4 * (32 + 4) + 4 * 16
    sparse = ApproximationConfig({"0": LayerChoice("fp32", 0.5)})  # mask 4 bytes + 16 kept fp32 values
    assert model_size_bytes(net, sparse) == 4 + 16 * 4 + 4 * 4 + 4 * 16
    sparse4 = ApproximationConfig({"0": LayerChoice("int4", 0.5)})  # sparse 4 + 8 bytes < dense 16, + 4 scales
    assert model_size_bytes(net, sparse4) == 4 + 8 + 4 * 4 + 4 * 4 + 4 * 16
    dense4 = ApproximationConfig({"0": LayerChoice("int4", 0.2)})  # round(6.4) = 6 pruned: sparse 4 + 13 > dense 16
    assert model_size_bytes(net, dense4) == 16 + 4 * 4 + 4 * 4 + 4 * 16
    assert size_ratio(net, ApproximationConfig({"0": LayerChoice()})) == 1.0


def test_model_size_equals_the_serialised_arrays():
    model = bn_net()
    config = ApproximationConfig({"0": LayerChoice("int4", 0.6), "3.0": LayerChoice("bf16"), "5": LayerChoice("int8")})
    packed = compress_model(model, config)
    blob = b"".join(a.tobytes() for arrays in packed.values() for a in arrays.values())
    weight_keys = {f"{name}.weight" for name in config.layers}
    for key, t in model.state_dict().items():
        if key not in weight_keys and t.is_floating_point():
            blob += t.numpy().astype(np.float32).tobytes()
    assert model_size_bytes(model, config) == len(blob) == model_size_bytes(model, config, packed)
    assert model_size_bytes(model, uniform(model)) == fp32_size_bytes(model)


# ------------------------------------------------------------------------------------------- presets and configs


def test_presets_exist_and_build():
    assert list(PRESETS) == ["fp32", "fp16", "bf16", "int8", "prune5", "prune10", "prune20"]
    model = digits()
    x = torch.rand(4, 1, 8, 8)
    ratios = {}
    for name in PRESETS:
        config = preset(name, model)
        assert list(config.layers) == DIGITS_LAYERS
        assert apply_approximation(model, config)(x).shape == (4, 10)
        ratios[name] = size_ratio(model, config)
    assert ratios["fp32"] == 1.0
    assert 0.5 < ratios["fp16"] == ratios["bf16"] < 0.51
    assert 0.25 < ratios["int8"] < 0.26
    assert 1.0 > ratios["prune5"] > ratios["prune10"] > ratios["prune20"]
    assert preset("int8", model, layers=["conv1"]).summary() == "conv1 int8"
    glob = preset("prune10", model, global_pruning=True)
    assert glob.global_prune == 0.1 and all(c == LayerChoice() for c in glob.layers.values())


def test_config_round_trips_through_json_and_summarises():
    config = ApproximationConfig(
        {
            "conv1": LayerChoice("int8"),
            "conv2": LayerChoice("int4", 0.2),
            "fc1": LayerChoice("fp16"),
            "fc2": LayerChoice(),
        }
    )
    assert config.summary() == "conv1 int8, conv2 int4/p0.2, fc1 fp16, fc2 fp32"
    data = json.loads(json.dumps(config.to_dict()))
    assert list(data) == ["layers", "global_prune"]
    assert list(data["layers"]) == ["conv1", "conv2", "fc1", "fc2"]
    assert data["layers"]["conv2"] == {"precision": "int4", "prune": 0.2}
    again = ApproximationConfig.from_dict(data)
    assert again == config and hash(again) == hash(config) and again.to_dict() == config.to_dict()
    reordered = ApproximationConfig(dict(reversed(config.layers.items())))
    assert reordered == config and hash(reordered) == hash(config)
    glob = ApproximationConfig({"fc1": LayerChoice()}, global_prune=0.1)
    assert glob.summary() == "fc1 fp32; global prune 0.1"
    assert ApproximationConfig.from_dict(glob.to_dict()) == glob


# ------------------------------------------------------------------------------------------------------- errors


def test_unknown_precision_suggests_the_closest():
    with pytest.raises(ApproximationError, match=r"unknown precision 'int 8' \(did you mean 'int8'\?\)") as info:
        LayerChoice("int 8")
    assert "fp32, fp16, bf16, int8, int4" in str(info.value)
    with pytest.raises(ApproximationError, match=r"layer 'fc1': unknown precision 'bf61' \(did you mean 'bf16'\?\)"):
        ApproximationConfig.from_dict({"layers": {"fc1": {"precision": "bf61"}}})


@pytest.mark.parametrize("amount", [-0.1, 1.0, 1.5, float("nan"), True, "0.1"])
def test_amount_outside_unit_interval(amount):
    with pytest.raises(ApproximationError, match=r"prune must be a number in \[0, 1\)"):
        LayerChoice("fp32", amount)
    with pytest.raises(ApproximationError, match=r"global_prune must be a number in \[0, 1\)"):
        ApproximationConfig({}, global_prune=amount)
    with pytest.raises(ApproximationError, match=r"layer 'fc2': prune must be"):
        ApproximationConfig.from_dict({"layers": {"fc2": {"prune": amount}}})


def test_unknown_layer_names_it_and_lists_the_valid_ones():
    model = digits()
    config = ApproximationConfig({"conv1": LayerChoice(), "fc3": LayerChoice("int8")})
    for call in (config.validate, lambda m: apply_approximation(m, config), lambda m: model_size_bytes(m, config)):
        with pytest.raises(ApproximationError, match=r"unknown layer 'fc3' \(did you mean 'fc\d'\?\)") as info:
            call(model)
        assert all(repr(name) in str(info.value) for name in DIGITS_LAYERS)
    with pytest.raises(ApproximationError, match="unknown layer 'pool'"):  # a module, but not a compressible one
        ApproximationConfig({"pool": LayerChoice()}).validate(model)
    with pytest.raises(ApproximationError, match="unknown layer 'fc9'"):
        preset("int8", model, layers=["fc9"])


def test_other_bad_inputs():
    with pytest.raises(ApproximationError, match=r"unknown preset 'prune15'.*choose one of fp32, fp16"):
        preset("prune15", digits())
    with pytest.raises(ApproximationError, match=r"global_prune=0.1 excludes per-layer pruning, but 'fc1' set prune"):
        ApproximationConfig({"fc1": LayerChoice("fp32", 0.2)}, global_prune=0.1)
    with pytest.raises(ApproximationError, match=r"unknown key 'precison' \(did you mean 'precision'\?\)"):
        ApproximationConfig.from_dict({"layers": {"fc1": {"precison": "int8"}}})
    with pytest.raises(ApproximationError, match=r"unknown key 'global' \(did you mean 'global_prune'\?\)"):
        ApproximationConfig.from_dict({"global": 0.1})
    with pytest.raises(ApproximationError, match="mask must be a bool tensor"):
        compress_layer(torch.ones(2, 2), LayerChoice(), torch.ones(2, 2))
    with pytest.raises(ApproximationError, match="need a 'scale' array"):
        decompress_layer({"values": np.zeros(4, dtype=np.int8)}, (2, 2))
    with pytest.raises(ApproximationError, match="dtype float64"):
        decompress_layer({"values": np.zeros(4)}, (2, 2))


def conv_family(seed: int = 0) -> nn.Module:
    """Conv1d, Conv2d and Conv3d layers side by side (every type a user's model may compress)."""
    torch.manual_seed(seed)
    return nn.ModuleDict(
        {"c1": nn.Conv1d(2, 3, 5), "c2": nn.Conv2d(2, 3, 3), "c3": nn.Conv3d(2, 4, 2), "fc": nn.Linear(6, 2)}
    )


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_conv1d_and_conv3d_quantize_per_output_channel(precision):
    model = conv_family()
    assert compressible_layers(model) == ["c1", "c2", "c3", "fc"]
    config = ApproximationConfig(dict.fromkeys(["c1", "c3"], LayerChoice(precision)))
    approx = apply_approximation(model, config)
    qmax = {"int8": 127, "int4": 7}[precision]
    for name in ("c1", "c3"):
        w, q = model[name].weight.detach(), approx[name].weight.detach()
        step = w.abs().flatten(1).amax(dim=1) / qmax  # one scale per output channel (dim 0)
        assert not torch.equal(w, q), "the layer really changed"
        assert torch.all((q - w).abs().flatten(1) <= step[:, None] / 2 + 1e-7)
        assert len(compress_model(model, config)[name]["scale"]) == w.shape[0]
    assert torch.equal(approx["c2"].weight, model["c2"].weight), "layers outside the config are untouched"
    c1, c3 = model["c1"].weight.numel(), model["c3"].weight.numel()
    per_value = 1 if precision == "int8" else 0.5
    expected = math.ceil(c1 * per_value) + 4 * 3 + math.ceil(c3 * per_value) + 4 * 4
    others = fp32_size_bytes(model) - 4 * (c1 + c3)
    assert model_size_bytes(model, config) == expected + others
