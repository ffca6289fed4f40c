"""bt_jax.convert: PyTorch <-> Flax names, layouts, strict key and shape checks, the projector.

(The numerical match with a real torchvision model is checked outside the repository, where
PyTorch is installed; here the layouts are checked against NumPy re-statements of PyTorch's ops.)
The files and the command line are tested in test_convert_cli.py.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from convert_helpers import official_state_dict, random_model_variables, random_variables

from bt_jax import convert, models
from bt_jax.convert import layout
from bt_jax.convert import model as convert_model
from bt_jax.convert import resnet as convert_resnet
from bt_jax.models import resnet


def test_torchvision_names_and_shapes_resnet50():
    sd = convert.flax_to_torchvision(random_variables("resnet50", num_classes=1000))
    assert len(sd) == 320  # len(torchvision.models.resnet50().state_dict())
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    assert sd["bn1.running_mean"].shape == (64,) and sd["bn1.weight"].shape == (64,)
    assert sd["layer1.0.conv1.weight"].shape == (64, 64, 1, 1)
    assert sd["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert sd["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)  # v1.5: the stride is in conv2
    assert sd["layer2.0.downsample.1.running_var"].shape == (512,)
    assert sd["layer4.2.bn3.num_batches_tracked"].dtype == np.int64
    assert sd["fc.weight"].shape == (1000, 2048) and sd["fc.bias"].shape == (1000,)
    # The Barlow Twins release: the same without fc.*.
    assert len(convert.flax_to_torchvision(random_variables("resnet50"))) == 318


@pytest.mark.parametrize("name,count", [("resnet18", 122), ("resnet34", 218), ("resnet101", 626)])
def test_key_counts_equal_torchvision(name, count):
    sd = convert.flax_to_torchvision(random_variables(name, width=8, num_classes=10))
    assert len(sd) == count


@pytest.mark.parametrize(
    "name,kw",
    [
        ("resnet18", dict(num_classes=1000)),
        ("resnet50", dict(width=16, stem="cifar")),
        ("resnet152", dict(width=4)),
    ],
)
def test_round_trip_is_exact(name, kw):
    variables = random_variables(name, **kw)
    sd = convert.flax_to_torchvision(variables)
    assert convert.infer_architecture(sd) == {
        "name": name,
        "stem": kw.get("stem", "imagenet"),
        "width": kw.get("width", 64),
        "num_classes": kw.get("num_classes"),
    }
    chex.assert_trees_all_equal(convert.torchvision_to_flax(sd), variables)
    back = convert.flax_to_torchvision(convert.torchvision_to_flax(sd))
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def mapped(variables):
    """The torchvision mapping of a partial tree (one layer), without the architecture check."""
    return layout.to_torch(variables, convert_resnet.backbone_entries(variables))


def torch_conv2d(x, w, stride, pad):
    """NumPy restatement of torch.nn.functional.conv2d: x [N, C, H, W], w [O, C, kh, kw]."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = w.shape[2:]
    ho = (x.shape[2] - kh) // stride + 1
    wo = (x.shape[3] - kw) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], ho, wo))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out


@pytest.mark.parametrize("kernel,stride", [(7, 2), (3, 2), (3, 1), (1, 2)])
def test_conv_layout_and_padding_match_pytorch(kernel, stride):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 3, kernel, kernel)).astype(np.float32)  # torch [O, I, kh, kw]
    x = rng.standard_normal((2, 3, 9, 9)).astype(
        np.float32
    )  # odd size: asymmetric "SAME" would differ
    flax_kernel = np.transpose(w, (2, 3, 1, 0))
    np.testing.assert_array_equal(
        mapped({"params": {"conv1": {"kernel": flax_kernel}}})["conv1.weight"], w
    )
    conv = resnet.conv(5, kernel, stride, jnp.float32, "conv1")
    out = conv.apply({"params": {"kernel": flax_kernel}}, x.transpose(0, 2, 3, 1))
    expected = torch_conv2d(x.astype(np.float64), w.astype(np.float64), stride, kernel // 2)
    np.testing.assert_allclose(
        np.asarray(out).transpose(0, 3, 1, 2), expected, rtol=1e-5, atol=1e-5
    )


def test_linear_and_batchnorm_layouts_match_pytorch():
    rng = np.random.default_rng(1)
    sd = {
        "fc.weight": rng.standard_normal((10, 2048)).astype(np.float32),
        "fc.bias": rng.standard_normal(10).astype(np.float32),
        "bn1.weight": rng.standard_normal(8).astype(np.float32),
        "bn1.bias": rng.standard_normal(8).astype(np.float32),
        "bn1.running_mean": rng.standard_normal(8).astype(np.float32),
        "bn1.running_var": rng.uniform(0.5, 2, 8).astype(np.float32),
    }
    # fc: torch y = x @ W.T + b.
    h = rng.standard_normal((3, 2048)).astype(np.float32)
    fc = {"kernel": sd["fc.weight"].T, "bias": sd["fc.bias"]}
    np.testing.assert_allclose(
        resnet.TorchLinear(10).apply({"params": fc}, h),
        h @ sd["fc.weight"].T + sd["fc.bias"],
        rtol=1e-4,
        atol=1e-4,
    )
    # BatchNorm eval: (x - running_mean) / sqrt(running_var + 1e-5) * weight + bias.
    bn_vars = {
        "params": {"scale": sd["bn1.weight"], "bias": sd["bn1.bias"]},
        "batch_stats": {"mean": sd["bn1.running_mean"], "var": sd["bn1.running_var"]},
    }
    x = rng.standard_normal((4, 2, 2, 8)).astype(np.float32)
    out = resnet.batch_norm(False, None, jnp.float32, "bn1").apply(bn_vars, x)
    expected = (x - sd["bn1.running_mean"]) / np.sqrt(sd["bn1.running_var"] + 1e-5) * sd[
        "bn1.weight"
    ] + sd["bn1.bias"]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # And the converter maps exactly these names.
    variables = {
        "params": {"bn1": bn_vars["params"], "fc": fc},
        "batch_stats": {"bn1": bn_vars["batch_stats"]},
    }
    back = mapped(variables)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v)
    assert back["bn1.num_batches_tracked"] == 0


@pytest.fixture(scope="module")
def r18_state_dict():
    return convert.flax_to_torchvision(random_variables("resnet18", width=8))


def test_missing_key_is_named(r18_state_dict):
    sd = dict(r18_state_dict)
    del sd["layer3.1.bn2.running_var"]
    with pytest.raises(
        convert.ConversionError, match=r"missing keys: \['layer3\.1\.bn2\.running_var'\]"
    ):
        convert.torchvision_to_flax(sd)


def test_extra_key_is_named(r18_state_dict):
    sd = dict(r18_state_dict, **{"layer1.0.conv3.weight": np.zeros((8, 8, 1, 1), np.float32)})
    with pytest.raises(
        convert.ConversionError, match=r"unexpected keys: \['layer1\.0\.conv3\.weight'\]"
    ):
        convert.torchvision_to_flax(sd, name="resnet18")
    sd = dict(r18_state_dict, **{"projector.0.weight": np.zeros((8, 8), np.float32)})
    with pytest.raises(convert.ConversionError, match=r"projector\.0\.weight"):
        convert.torchvision_to_flax(sd)


def test_wrong_shape_is_named(r18_state_dict):
    sd = dict(r18_state_dict, **{"layer2.0.conv1.weight": np.zeros((16, 8, 1, 1), np.float32)})
    with pytest.raises(
        convert.ConversionError, match=r"layer2\.0\.conv1\.weight has shape \(16, 8, 1, 1\)"
    ):
        convert.torchvision_to_flax(sd)


def test_num_batches_tracked_optional_and_fc_selects_head(r18_state_dict):
    sd = {k: v for k, v in r18_state_dict.items() if not k.endswith("num_batches_tracked")}
    variables = convert.torchvision_to_flax(sd)
    assert "fc" not in variables["params"]
    sd["fc.weight"] = np.ones((7, 64), np.float32)
    sd["fc.bias"] = np.ones((7,), np.float32)
    variables = convert.torchvision_to_flax(sd)
    assert variables["params"]["fc"]["kernel"].shape == (64, 7)
    del sd["fc.weight"]  # a bias alone is not a head
    with pytest.raises(convert.ConversionError, match=r"unexpected keys: \['fc\.bias'\]"):
        convert.torchvision_to_flax(sd)


def test_unknown_depth_and_wrong_arch_are_reported(r18_state_dict):
    sd = {k: v for k, v in r18_state_dict.items() if not k.startswith("layer4.1.")}
    with pytest.raises(convert.ConversionError, match=r"blocks per stage \[2, 2, 2, 1\].*resnet18"):
        convert.torchvision_to_flax(sd)
    # 10 missing keys: the first 8 named, then the count (one readable line).
    listed = r"missing keys: \['layer4\.1\.bn1\.bias', ('[\w.]+', ){7}\.\.\.\] \(10 in all\)"
    with pytest.raises(convert.ConversionError, match=listed):
        convert.torchvision_to_flax(sd, name="resnet18")
    with pytest.raises(convert.ConversionError, match="Unknown architecture 'resnet19'"):
        convert.torchvision_to_flax(sd, name="resnet19")
    prefixed = {f"module.{k}": v for k, v in r18_state_dict.items()}
    with pytest.raises(convert.ConversionError, match="prefix"):
        convert.torchvision_to_flax(prefixed)


def test_flax_side_errors():
    variables = random_variables("resnet18", width=8)
    no_stats = {"params": variables["params"], "batch_stats": {}}
    with pytest.raises(convert.ConversionError, match="batch_stats/bn1/mean is missing"):
        convert.flax_to_torchvision(no_stats)
    stray = {
        "params": dict(variables["params"], head={"w": np.zeros(3)}),
        "batch_stats": variables["batch_stats"],
    }
    with pytest.raises(convert.ConversionError, match="head/w"):
        convert.flax_to_torchvision(stray)
    bt = {
        "params": {"backbone": variables["params"], "projector": {}},
        "batch_stats": {"backbone": variables["batch_stats"]},
    }
    with pytest.raises(convert.ConversionError, match="backbone_variables"):
        convert.flax_to_torchvision(bt)
    chex.assert_trees_all_equal(convert.backbone_variables(bt), variables)


def test_converted_variables_run_in_the_model(r18_state_dict):
    variables = convert.torchvision_to_flax(r18_state_dict)
    model = models.create("resnet18", width=8)
    out = model.apply(variables, jnp.ones((1, 32, 32, 3)), train=False)
    assert out.shape == (1, 64) and np.all(np.isfinite(out))


def test_flax_side_shapes_are_checked_against_the_architecture():
    variables = random_variables("resnet18", width=8)
    variables["params"]["layer1_0"]["conv2"]["kernel"] = np.zeros((3, 3, 8, 9), np.float32)
    with pytest.raises(
        convert.ConversionError,
        match=r"params/layer1_0/conv2/kernel has shape \(3, 3, 8, 9\), needs \(3, 3, 8, 8\)",
    ):
        convert.flax_to_torchvision(variables)


def test_non_finite_weights_are_refused_with_the_first_key_and_count(r18_state_dict):
    sd = dict(r18_state_dict)
    sd["layer2.0.conv1.weight"] = sd["layer2.0.conv1.weight"].copy()
    sd["layer2.0.conv1.weight"].flat[:3] = [np.nan, np.inf, -np.inf]
    sd["fc.weight"] = np.full((2, 64), np.nan, np.float32)
    sd["fc.bias"] = np.zeros(2, np.float32)
    with pytest.raises(
        convert.ConversionError,
        match=r"non-finite weights: fc.weight \(params/fc/kernel\) has 128 NaN/inf values out "
        r"of 128; "
        r"1 more arrays hold some too",
    ):
        convert.torchvision_to_flax(sd)
    # float64 weights beyond float32's range would become inf: refused too.
    big = dict(r18_state_dict, **{"bn1.bias": np.full(8, 1e39)})
    with pytest.raises(
        convert.ConversionError, match=r"bn1.bias \(params/bn1/bias\) has 8 NaN/inf"
    ):
        convert.torchvision_to_flax(big)
    variables = random_variables("resnet18", width=8)
    variables["batch_stats"]["bn1"]["var"][0] = np.inf
    with pytest.raises(
        convert.ConversionError, match=r"batch_stats/bn1/var \(bn1.running_var\) has 1 NaN/inf"
    ):
        convert.flax_to_torchvision(variables)


# ---------------------------------------------------------------------------------------------
# The official model: backbone + projector (+ the loss BatchNorm, checked and not carried).

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def torch_projector(x, sd, spec, prefix="module."):
    """NumPy restatement of main.py's projector in eval mode (float64): Linear (y = x W^T, no
    bias) -> BatchNorm1d ((x - running_mean) / sqrt(running_var + 1e-5) * weight + bias) -> ReLU."""
    p = {
        k[len(prefix + "projector.") :]: v.astype(np.float64)
        for k, v in sd.items()
        if ".projector." in "." + k
    }
    n = len(spec.split("-"))
    x = x.astype(np.float64)
    for i in range(n - 1):
        x = x @ p[f"{3 * i}.weight"].T
        bn = f"{3 * i + 1}"
        x = (x - p[f"{bn}.running_mean"]) / np.sqrt(p[f"{bn}.running_var"] + 1e-5) * p[
            f"{bn}.weight"
        ] + p[f"{bn}.bias"]
        x = np.maximum(x, 0)
    return x @ p[f"{3 * (n - 1)}.weight"].T


def test_official_model_names_and_shapes():
    """The full-size official model: 318 backbone keys, 13 projector keys (0/1/3/4/6), 3 of bn."""
    template = convert.expected_model_shapes("resnet50", spec="8192-8192-8192")
    structs = layout.torch_shapes(convert_model.model_entries(template, "module.", 8192), template)
    shapes = {k: v.shape for k, v in structs.items()}
    assert len(shapes) == 334  # len(main.py's BarlowTwins(args).state_dict()), checked with torch
    assert sum(k.startswith("module.backbone.") for k in shapes) == 318
    assert shapes["module.backbone.layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    projector = {
        k[len("module.projector.") :]: v
        for k, v in shapes.items()
        if k.startswith("module.projector.")
    }
    assert projector == {
        "0.weight": (8192, 2048),
        **{f"1.{k}": () if k == "num_batches_tracked" else (8192,) for k in BN_KEYS},
        "3.weight": (8192, 8192),
        **{f"4.{k}": () if k == "num_batches_tracked" else (8192,) for k in BN_KEYS},
        "6.weight": (8192, 8192),
    }
    assert {k: v for k, v in shapes.items() if k.startswith("module.bn.")} == {
        "module.bn.running_mean": (8192,),
        "module.bn.running_var": (8192,),
        "module.bn.num_batches_tracked": (),
    }
    projector_params = template["params"]["projector"]
    assert sorted(projector_params) == ["bn0", "bn1", "linear0", "linear1", "linear2"]
    assert projector_params["linear0"]["kernel"].shape == (2048, 8192)
    assert (
        convert.infer_projector_spec({k[len("module.") :]: v for k, v in structs.items()})
        == "8192-8192-8192"
    )


def test_projector_numerics_match_numpy_restatement_of_torch():
    spec = "48-48-24"
    sd = official_state_dict(spec)
    variables = convert.torch_to_flax_model(sd)  # "module." found by itself
    x = np.random.default_rng(2).standard_normal((5, 32)).astype(np.float32)
    projector_vars = {c: variables[c]["projector"] for c in ("params", "batch_stats")}
    out = models.Projector(spec).apply(projector_vars, x, train=False)
    chex.assert_trees_all_close(
        np.asarray(out, np.float64), torch_projector(x, sd, spec), rtol=1e-5, atol=1e-5
    )
    # And in the whole model: the projector reads the backbone's representation.
    model = models.BarlowTwinsModel(
        models.create("resnet18", width=4, stem="cifar"), models.Projector(spec)
    )
    images = np.random.default_rng(3).standard_normal((5, 32, 32, 3)).astype(np.float32)
    representation, embedding = model.apply(variables, images, train=False)
    expected = torch_projector(np.asarray(representation), sd, spec)
    chex.assert_trees_all_close(np.asarray(embedding, np.float64), expected, rtol=1e-5, atol=1e-5)


def test_official_model_round_trip_is_exact():
    sd = official_state_dict()
    variables = convert.torch_to_flax_model(sd)
    assert sorted(variables["params"]) == ["backbone", "projector"]
    assert sorted(variables["params"]["projector"]) == [
        "bn0",
        "bn1",
        "linear0",
        "linear1",
        "linear2",
    ]
    np.testing.assert_array_equal(
        variables["params"]["projector"]["linear1"]["kernel"], sd["module.projector.3.weight"].T
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["projector"]["bn1"]["var"], sd["module.projector.4.running_var"]
    )
    back = convert.flax_model_to_torch(variables, prefix="module.")
    assert sorted(back) == sorted(sd)
    # Everything comes back bit for bit but what Flax does not keep: the BatchNorm step counts
    # and the loss BatchNorm's statistics, written as PyTorch's initial values.
    not_kept = {k for k in sd if k.endswith("num_batches_tracked") or k.startswith("module.bn.")}
    chex.assert_trees_all_equal(
        {k: back[k] for k in sd if k not in not_kept}, {k: sd[k] for k in sd if k not in not_kept}
    )
    chex.assert_trees_all_equal(
        {k: back[k] for k in sorted(not_kept)},
        {k: np.zeros((), np.int64) for k in sorted(not_kept) if k.endswith("num_batches_tracked")}
        | {
            "module.bn.running_mean": np.zeros(24, np.float32),
            "module.bn.running_var": np.ones(24, np.float32),
        },
    )
    chex.assert_trees_all_equal(convert.torch_to_flax_model(back), variables)
    # Without the prefix: the keys of a plain main.py BarlowTwins(args).
    plain = convert.flax_model_to_torch(variables)
    assert (
        "backbone.conv1.weight" in plain
        and "projector.0.weight" in plain
        and "bn.running_var" in plain
    )
    chex.assert_trees_all_equal(convert.torch_to_flax_model(plain), variables)


def test_barlow_twins_model_init_interoperates():
    """The output is exactly BarlowTwinsModel's variables: init, to torch and back, apply."""
    model = models.BarlowTwinsModel(
        models.create("resnet18", width=4, stem="cifar"), models.Projector("16-16-8")
    )
    images = jnp.asarray(np.random.default_rng(4).standard_normal((4, 32, 32, 3)), jnp.float32)
    variables = model.init(jax.random.PRNGKey(0), images)
    sd = convert.flax_model_to_torch(variables, prefix="module.")
    back = convert.torch_to_flax_model(sd)
    chex.assert_trees_all_equal(back, jax.device_get(variables))
    apply = jax.jit(lambda v: model.apply(v, images, train=False))
    chex.assert_trees_all_equal(apply(back), apply(variables))


@pytest.mark.parametrize("spec", ["16", "32-16", "24-24-24-8"])
def test_projector_spec_is_read_from_the_shapes(spec):
    sd = official_state_dict(spec, prefix="")
    assert convert.infer_projector_spec(sd) == spec
    variables = convert.torch_to_flax_model(sd)
    assert len(variables["params"]["projector"]) == 2 * len(spec.split("-")) - 1
    chex.assert_trees_all_equal(
        convert.torch_to_flax_model(convert.flax_model_to_torch(variables)), variables
    )


def test_official_model_errors_name_the_keys():
    sd = official_state_dict()
    backbone_only = {k: v for k, v in sd.items() if k.startswith("module.backbone.")}
    with pytest.raises(
        convert.ConversionError, match="hold no official projector.*without --with-projector"
    ):
        convert.torch_to_flax_model(backbone_only)
    cases = [
        (
            {"module.projector.4.running_var": None},
            r"missing keys: \['module\.projector\.4\.running_var'\]",
        ),
        (
            {"module.projector.0.weight": np.zeros((48, 64), np.float32)},
            r"module\.projector\.0\.weight has shape \(48, 64\), needs \(48, 32\)",
        ),
        (
            {"module.projector.2.bias": np.zeros(48, np.float32)},
            r"unexpected keys: \['module\.projector\.2\.bias'\]",
        ),
        (
            {"module.bn.running_mean": np.zeros(10, np.float32)},
            r"module\.bn\.running_mean has shape \(10,\), needs \(24,\)",
        ),
        (
            {"module.backbone.fc.weight": np.zeros((3, 32), np.float32)},
            r"unexpected keys: \['module\.backbone\.fc\.weight'\]",
        ),
        (
            {"module.projector.5.weight": np.zeros((4, 4), np.float32)},
            r"Linear layers at indices \[0, 3, 5, 6\]",
        ),
    ]
    for change, message in cases:
        broken = {k: v for k, v in {**sd, **change}.items() if v is not None}
        with pytest.raises(convert.ConversionError, match=message):
            convert.torch_to_flax_model(broken)
    with pytest.raises(convert.ConversionError, match=r"No key starts with 'backbone\.'.*--prefix"):
        convert.torch_to_flax_model(sd, prefix="")
    with pytest.raises(convert.ConversionError, match=r"resnet19"):
        convert.torch_to_flax_model(sd, arch="resnet19")
    nan = dict(
        sd,
        **{
            "module.projector.3.weight": np.where(
                np.eye(48, dtype=bool), np.nan, sd["module.projector.3.weight"]
            )
        },
    )
    with pytest.raises(
        convert.ConversionError,
        match=r"module\.projector\.3\.weight \(params/projector/linear1/kernel\) has 48 NaN/inf",
    ):
        convert.torch_to_flax_model(nan)


def test_flax_model_errors_name_the_paths():
    variables = random_model_variables()
    with pytest.raises(convert.ConversionError, match=r"params/backbone and params/projector"):
        convert.flax_model_to_torch(convert.backbone_variables(variables))
    wrong = random_model_variables()
    wrong["params"]["backbone"]["layer1_0"]["conv2"]["kernel"] = np.zeros((3, 3, 8, 9), np.float32)
    with pytest.raises(
        convert.ConversionError,
        match=r"params/backbone/layer1_0/conv2/kernel has shape \(3, 3, 8, 9\)",
    ):
        convert.flax_model_to_torch(wrong)
    stray = random_model_variables()
    stray["params"]["projector"]["head"] = {"kernel": np.zeros((24, 2), np.float32)}
    with pytest.raises(
        convert.ConversionError, match=r"Projector module 'head' has no official counterpart"
    ):
        convert.flax_model_to_torch(stray)
    inf = random_model_variables()
    inf["batch_stats"]["projector"]["bn0"]["var"][:2] = np.inf
    with pytest.raises(
        convert.ConversionError,
        match=r"batch_stats/projector/bn0/var \(module\.projector\.1\.running_var\) has 2 NaN/inf",
    ):
        convert.flax_model_to_torch(inf, prefix="module.")
