"""bt_jax.convert: torchvision <-> Flax names, layouts, strict key checks, the command line.

(The numerical match with a real torchvision model is checked outside the repository, where
PyTorch is installed; here the layouts are checked against NumPy re-statements of PyTorch's ops.)
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bt_jax import convert, models
from bt_jax.models import resnet


def random_variables(name, seed=0, **kw):
    """Backbone variables with random values, from the shape template (no model init, no compile)."""
    template = convert.expected_shapes(name, **kw)
    leaves, treedef = jax.tree_util.tree_flatten(template)
    rng = np.random.default_rng(seed)
    values = [rng.standard_normal(x.shape).astype(np.float32) for x in leaves]
    variables = jax.tree_util.tree_unflatten(treedef, values)
    # Variances positive, as a real running average.
    variables["batch_stats"] = jax.tree_util.tree_map(np.abs, variables["batch_stats"])
    return variables


def assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


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
    [("resnet18", dict(num_classes=1000)), ("resnet50", dict(width=16, stem="cifar")), ("resnet152", dict(width=4))],
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
    assert_trees_equal(convert.torchvision_to_flax(sd), variables)
    back = convert.flax_to_torchvision(convert.torchvision_to_flax(sd))
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def torch_conv2d(x, w, stride, pad):
    """NumPy restatement of torch.nn.functional.conv2d: x [N, C, H, W], w [O, C, kh, kw], no bias."""
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
    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)  # odd size: asymmetric "SAME" would differ
    sd = convert.flax_to_torchvision({"params": {"conv1": {"kernel": np.zeros((kernel, kernel, 3, 5))}}})
    assert sd["conv1.weight"].shape == w.shape
    flax_kernel = np.transpose(w, (2, 3, 1, 0))
    np.testing.assert_array_equal(
        convert.flax_to_torchvision({"params": {"conv1": {"kernel": flax_kernel}}})["conv1.weight"], w
    )
    conv = resnet.conv(5, kernel, stride, jnp.float32, "conv1")
    out = conv.apply({"params": {"kernel": flax_kernel}}, x.transpose(0, 2, 3, 1))
    expected = torch_conv2d(x.astype(np.float64), w.astype(np.float64), stride, kernel // 2)
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), expected, rtol=1e-5, atol=1e-5)


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
        resnet.TorchLinear(10).apply({"params": fc}, h), h @ sd["fc.weight"].T + sd["fc.bias"], rtol=1e-4, atol=1e-4
    )
    # BatchNorm eval: (x - running_mean) / sqrt(running_var + 1e-5) * weight + bias.
    bn_vars = {
        "params": {"scale": sd["bn1.weight"], "bias": sd["bn1.bias"]},
        "batch_stats": {"mean": sd["bn1.running_mean"], "var": sd["bn1.running_var"]},
    }
    x = rng.standard_normal((4, 2, 2, 8)).astype(np.float32)
    out = resnet.batch_norm(False, None, jnp.float32, "bn1").apply(bn_vars, x)
    expected = (x - sd["bn1.running_mean"]) / np.sqrt(sd["bn1.running_var"] + 1e-5) * sd["bn1.weight"] + sd["bn1.bias"]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # And the converter maps exactly these names.
    variables = {"params": {"bn1": bn_vars["params"], "fc": fc}, "batch_stats": {"bn1": bn_vars["batch_stats"]}}
    back = convert.flax_to_torchvision(variables)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v)
    assert back["bn1.num_batches_tracked"] == 0


@pytest.fixture(scope="module")
def r18_state_dict():
    return convert.flax_to_torchvision(random_variables("resnet18", width=8))


def test_missing_key_is_named(r18_state_dict):
    sd = dict(r18_state_dict)
    del sd["layer3.1.bn2.running_var"]
    with pytest.raises(convert.ConversionError, match=r"missing keys: \['layer3\.1\.bn2\.running_var'\]"):
        convert.torchvision_to_flax(sd)


def test_extra_key_is_named(r18_state_dict):
    sd = dict(r18_state_dict, **{"layer1.0.conv3.weight": np.zeros((8, 8, 1, 1), np.float32)})
    with pytest.raises(convert.ConversionError, match=r"unexpected keys: \['layer1\.0\.conv3\.weight'\]"):
        convert.torchvision_to_flax(sd, name="resnet18")
    sd = dict(r18_state_dict, **{"projector.0.weight": np.zeros((8, 8), np.float32)})
    with pytest.raises(convert.ConversionError, match=r"projector\.0\.weight"):
        convert.torchvision_to_flax(sd)


def test_wrong_shape_is_named(r18_state_dict):
    sd = dict(r18_state_dict, **{"layer2.0.conv1.weight": np.zeros((16, 8, 1, 1), np.float32)})
    with pytest.raises(convert.ConversionError, match=r"layer2\.0\.conv1\.weight has shape \(16, 8, 1, 1\)"):
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
    with pytest.raises(convert.ConversionError, match=r"missing keys: \['layer4\.1\.bn1\.bias'"):
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
    stray = {"params": dict(variables["params"], head={"w": np.zeros(3)}), "batch_stats": variables["batch_stats"]}
    with pytest.raises(convert.ConversionError, match="head/w"):
        convert.flax_to_torchvision(stray)
    bt = {"params": {"backbone": variables["params"], "projector": {}}, "batch_stats": {"backbone": variables["batch_stats"]}}
    with pytest.raises(convert.ConversionError, match="backbone_variables"):
        convert.flax_to_torchvision(bt)
    assert_trees_equal(convert.backbone_variables(bt), variables)


def test_converted_variables_run_in_the_model(r18_state_dict):
    variables = convert.torchvision_to_flax(r18_state_dict)
    model = models.create("resnet18", width=8)
    out = model.apply(variables, jnp.ones((1, 32, 32, 3)), train=False)
    assert out.shape == (1, 64) and np.all(np.isfinite(out))


def test_command_line_round_trip(tmp_path, r18_state_dict):
    src = tmp_path / "tv.npz"
    np.savez(src, **r18_state_dict)
    assert convert.main([str(src), str(tmp_path / "flax.msgpack")]) == 0
    variables = convert.load_variables(str(tmp_path / "flax.msgpack"))
    assert_trees_equal(variables, convert.torchvision_to_flax(r18_state_dict))
    assert convert.main([str(tmp_path / "flax.msgpack"), str(tmp_path / "back.npz")]) == 0
    with np.load(tmp_path / "back.npz") as back:
        assert sorted(back.keys()) == sorted(r18_state_dict)
        for k in back.keys():
            np.testing.assert_array_equal(back[k], r18_state_dict[k])
    # Flax .npz ("/" keys) also works as either end.
    assert convert.main([str(src), str(tmp_path / "flax.npz")]) == 0
    assert_trees_equal(convert.load_variables(str(tmp_path / "flax.npz")), variables)


def test_command_line_prefix_and_errors(tmp_path, r18_state_dict, capsys):
    full = {f"module.backbone.{k}": v for k, v in r18_state_dict.items()}
    full["module.projector.0.weight"] = np.zeros((4, 64), np.float32)
    src = tmp_path / "ckpt.npz"
    np.savez(src, **full)
    assert convert.main([str(src), str(tmp_path / "out.msgpack")]) == 1
    assert "prefix" in capsys.readouterr().err
    assert convert.main([str(src), str(tmp_path / "out.msgpack"), "--prefix", "module.backbone."]) == 0
    out = capsys.readouterr().out
    assert "Ignored 1 keys outside prefix" in out and "module.projector.0.weight" in out
    broken = dict(r18_state_dict)
    del broken["bn1.weight"]
    np.savez(tmp_path / "broken.npz", **broken)
    assert convert.main([str(tmp_path / "broken.npz"), str(tmp_path / "x.msgpack")]) == 1
    assert "bn1.weight" in capsys.readouterr().err
    assert convert.main([str(tmp_path / "nope.pth"), str(tmp_path / "x.msgpack")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_pth_without_torch_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    path = tmp_path / "w.pth"
    path.write_bytes(b"")
    with pytest.raises(SystemExit, match=r"bt_jax\[torch\]"):
        convert.load_state_dict(str(path))
