"""bt_jax.models: shapes, parameter counts, init, BatchNorm semantics, pmap, bfloat16."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bt_jax import models
from bt_jax.models import resnet
from bt_jax.models.resnet import BasicBlock, Bottleneck

# torchvision's figures (sum of p.numel() over model.parameters(), 1000-class head).
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}
FEATURES = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "resnet101": 2048,
    "resnet152": 2048,
}


def key(seed: int = 0) -> jax.Array:
    # The "rbg" generator compiles far faster on CPU than the default threefry (ResNet init: ~4x).
    return jax.random.key(seed, impl="rbg")


def normal(seed: int, shape) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def shapes_of(model, x_shape):
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    out = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
    return variables, out


@pytest.mark.parametrize("name", list(TORCHVISION_PARAMS))
@pytest.mark.parametrize("stem,size", [("imagenet", 224), ("cifar", 32)])
def test_output_shapes(name, stem, size):
    _, out = shapes_of(models.create(name, stem=stem), (2, size, size, 3))
    assert out.shape == (2, FEATURES[name]) and out.dtype == jnp.float32


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_width_scales_representation(name):
    _, out = shapes_of(models.create(name, width=16, stem="cifar"), (3, 32, 32, 3))
    assert out.shape == (3, FEATURES[name] // 4)
    assert models.create(name, width=16).num_features == FEATURES[name] // 4


@pytest.mark.parametrize("name", list(TORCHVISION_PARAMS))
def test_parameter_counts_equal_torchvision(name):
    variables, out = shapes_of(models.create(name, num_classes=1000), (1, 224, 224, 3))
    assert out.shape == (1, 1000)
    assert count(variables["params"]) == TORCHVISION_PARAMS[name]


def test_resnet50_backbone_without_head():
    variables, _ = shapes_of(models.create("resnet50"), (1, 224, 224, 3))
    assert count(variables["params"]) == 23_508_032
    assert "fc" not in variables["params"]


def test_variable_names_follow_torchvision():
    variables, _ = shapes_of(models.create("resnet50", num_classes=10), (1, 64, 64, 3))
    p, s = variables["params"], variables["batch_stats"]
    assert set(p) == {"conv1", "bn1", "fc"} | {
        f"layer{i + 1}_{j}" for i, n in enumerate((3, 4, 6, 3)) for j in range(n)
    }
    assert set(p["layer2_0"]) == {
        "conv1",
        "bn1",
        "conv2",
        "bn2",
        "conv3",
        "bn3",
        "downsample_0",
        "downsample_1",
    }
    assert "downsample_0" not in p["layer2_1"]
    # ResNet v1.5: the stride sits in the 3x3 conv; layer1_0 gets a shortcut (64 -> 256 channels).
    assert "downsample_0" in p["layer1_0"]
    assert p["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
    assert set(s["layer2_0"]["downsample_1"]) == {"mean", "var"}
    assert p["conv1"]["kernel"].shape == (7, 7, 3, 64)


def test_stem_kernel_and_pooling():
    imagenet, _ = shapes_of(models.create("resnet18", width=8), (1, 64, 64, 3))
    cifar, _ = shapes_of(models.create("resnet18", width=8, stem="cifar"), (1, 32, 32, 3))
    assert imagenet["params"]["conv1"]["kernel"].shape == (7, 7, 3, 8)
    assert cifar["params"]["conv1"]["kernel"].shape == (3, 3, 3, 8)

    def intermediates(model, size):
        x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
        variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
        apply = functools.partial(
            model.apply, train=False, capture_intermediates=True, mutable=["intermediates"]
        )
        _, state = jax.eval_shape(apply, variables, x)
        return {
            k: v["__call__"][0].shape for k, v in state["intermediates"].items() if k != "__call__"
        }

    # imagenet: /2 conv, /2 max-pool before layer1, then /2 in layers 2-4 (224 -> 7).
    shapes = intermediates(models.create("resnet18", width=8), 224)
    assert shapes["conv1"] == (1, 112, 112, 8)
    assert shapes["layer1_0"] == (1, 56, 56, 8)
    assert shapes["layer4_1"] == (1, 7, 7, 64)
    # cifar: no downsampling before layer1 (32 -> 4).
    shapes = intermediates(models.create("resnet50", width=8, stem="cifar"), 32)
    assert shapes["conv1"] == (1, 32, 32, 8)
    assert shapes["layer1_0"] == (1, 32, 32, 32)
    assert shapes["layer4_2"] == (1, 4, 4, 256)


def test_create_errors_and_dtype_strings():
    with pytest.raises(ValueError, match="resnet18, resnet34, resnet50, resnet101, resnet152"):
        models.create("resnet51")
    with pytest.raises(ValueError, match="stem"):
        models.create("resnet18", stem="tiny")
    with pytest.raises(TypeError, match="widht"):
        models.create("resnet18", widht=8)
    with pytest.raises(ValueError, match="dtype"):
        models.create("resnet18", dtype="float33")
    assert models.create("ResNet50", dtype="bfloat16").dtype == jnp.bfloat16
    assert isinstance(models.create("resnet34"), models.ResNet34)


def test_conv_and_linear_init_follow_torchvision():
    # Kaiming normal, fan_out = 3 * 3 * 256, untruncated.
    conv = resnet.conv(256, 3, 1, jnp.float32, "conv")
    k = np.asarray(conv.init(key(0), jnp.zeros((1, 3, 3, 256)))["params"]["kernel"])
    assert k.shape == (3, 3, 256, 256)
    assert abs(k.std() / np.sqrt(2.0 / (9 * 256)) - 1) < 0.02 and abs(k.mean()) < 1e-3
    assert np.abs(k).max() > 4 * k.std()  # tails: not a truncated normal
    # torch.nn.Linear: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    fc = resnet.TorchLinear(100).init(key(1), jnp.zeros((1, 256)))["params"]
    w, b = np.asarray(fc["kernel"]), np.asarray(fc["bias"])
    assert w.shape == (256, 100) and np.abs(w).max() <= 1 / 16 and np.abs(w).max() > 0.99 / 16
    assert abs(w.std() / (1 / 16 / np.sqrt(3)) - 1) < 0.03
    assert b.shape == (100,) and np.abs(b).max() <= 1 / 16 and np.abs(b).max() > 0.9 / 16


def test_zero_init_residual_zeroes_last_bn_of_each_branch():
    # Model level for resnet18; the Bottleneck's bn3 is checked by the block test below.
    model = models.create(
        "resnet18", width=4, stem="cifar", zero_init_residual=True, num_classes=10
    )
    params = model.init(key(0), jnp.zeros((1, 8, 8, 3)), train=False)["params"]
    blocks = [k for k in params if k.startswith("layer")]
    assert len(blocks) == 8
    for block in blocks:
        assert np.all(np.asarray(params[block]["bn2"]["scale"]) == 0), block
        assert np.all(np.asarray(params[block]["bn1"]["scale"]) == 1), block
    assert np.all(np.asarray(params["bn1"]["scale"]) == 1) and np.all(
        np.asarray(params["bn1"]["bias"]) == 0
    )
    assert np.all(np.asarray(params["layer2_0"]["downsample_1"]["scale"]) == 1)
    default = models.create("resnet18", width=4, stem="cifar")
    assert not default.zero_init_residual  # torchvision's default


@pytest.mark.parametrize(
    "block_cls,planes,channels,strides",
    [
        (BasicBlock, 8, 8, 1),  # identity shortcut
        (BasicBlock, 16, 8, 2),  # projection shortcut
        (Bottleneck, 4, 16, 1),  # identity shortcut (4 * 4 = 16)
        (Bottleneck, 8, 16, 2),  # projection shortcut
    ],
)
@pytest.mark.parametrize("train", [True, False])
def test_zero_init_residual_block_starts_as_its_shortcut(
    block_cls, planes, channels, strides, train
):
    # Inputs of a block are post-ReLU, hence non-negative.
    x = jax.nn.relu(normal(1, (4, 8, 8, channels)))
    block = block_cls(planes=planes, strides=strides, zero_init_residual=True)
    variables = block.init(key(0), x, train=False)
    out, _ = block.apply(variables, x, train=train, mutable=["batch_stats"])
    last = "bn3" if block_cls is Bottleneck else "bn2"
    assert np.all(np.asarray(variables["params"][last]["scale"]) == 0)
    if "downsample_0" not in variables["params"]:
        np.testing.assert_array_equal(out, x)
        return
    # The shortcut alone: 1x1 conv with the block's stride, then BatchNorm, then the block's ReLU.
    kernel = variables["params"]["downsample_0"]["kernel"]
    y = jax.lax.conv_general_dilated(
        x, kernel, (strides, strides), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    if train:
        mean, var = y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))
    else:
        stats = variables["batch_stats"]["downsample_1"]
        mean, var = stats["mean"], stats["var"]
    expected = jax.nn.relu((y - mean) / jnp.sqrt(var + 1e-5))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_batchnorm_matches_pytorch_semantics():
    """Biased batch variance, eps 1e-5, running = 0.9 running + 0.1 batch (PyTorch momentum 0.1)."""
    proj = models.Projector("6-5")
    x = normal(0, (16, 4)) * 3 + 1
    variables = proj.init(key(1), x)
    out, upd = proj.apply(variables, x, mutable=["batch_stats"])
    h = x @ variables["params"]["linear0"]["kernel"]
    mean, var = h.mean(0), h.var(0)  # biased
    np.testing.assert_allclose(upd["batch_stats"]["bn0"]["mean"], 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["bn0"]["var"], 0.9 + 0.1 * var, rtol=1e-5)
    expected = (
        jax.nn.relu((h - mean) / jnp.sqrt(var + 1e-5)) @ variables["params"]["linear1"]["kernel"]
    )
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    # Eval mode: running averages, no update needed.
    out_eval = proj.apply(variables, x, train=False)
    expected_eval = jax.nn.relu(h / jnp.sqrt(1 + 1e-5)) @ variables["params"]["linear1"]["kernel"]
    np.testing.assert_allclose(out_eval, expected_eval, rtol=1e-4, atol=1e-5)


def test_projector_structure_and_spec_errors():
    proj = models.Projector("64-64-32")
    variables = proj.init(key(0), jnp.zeros((4, 48)))
    p = variables["params"]
    assert set(p) == {"linear0", "bn0", "linear1", "bn1", "linear2"}
    assert set(p["linear0"]) == {"kernel"} and set(p["linear2"]) == {"kernel"}  # no biases
    assert p["linear0"]["kernel"].shape == (48, 64) and p["linear2"]["kernel"].shape == (64, 32)
    assert np.abs(np.asarray(p["linear0"]["kernel"])).max() <= 1 / np.sqrt(48)
    out, _ = proj.apply(variables, jnp.ones((4, 48)), mutable=["batch_stats"])
    assert out.shape == (4, 32) and out.dtype == jnp.float32
    assert models.parse_spec("8192-8192-8192") == (8192, 8192, 8192)
    for bad in ["", "8192-", "8192-x-8192", "0-5", "-3", "1.5-2"]:
        with pytest.raises(ValueError, match="spec"):
            models.Projector(bad)
    # The official projector's size: about 151M parameters at 2048 -> 8192-8192-8192.
    shapes = jax.eval_shape(
        models.Projector("8192-8192-8192").init, jax.random.PRNGKey(0), jnp.zeros((2, 2048))
    )
    assert count(shapes["params"]) == 2048 * 8192 + 2 * 8192 * 8192 + 4 * 8192


def test_barlow_twins_model_per_view_calls():
    backbone = models.create("resnet18", width=8, stem="cifar", zero_init_residual=True)
    model = models.BarlowTwinsModel(backbone, models.Projector("32-32-16"))
    y1 = normal(0, (4, 16, 16, 3))
    y2 = normal(1, (4, 16, 16, 3))
    variables = model.init(key(2), y1)
    assert set(variables["params"]) == {"backbone", "projector"}
    assert set(variables["batch_stats"]) == {"backbone", "projector"}
    params = variables["params"]
    (r1, z1), upd = model.apply(variables, y1, mutable=["batch_stats"])
    (r2, z2), upd = model.apply({"params": params, **upd}, y2, mutable=["batch_stats"])
    assert r1.shape == (4, 64) and z1.shape == (4, 16) and r2.dtype == z2.dtype == jnp.float32
    # Per-view normalisation: a view's outputs do not depend on the other view.
    (r1b, z1b), _ = model.apply(variables, y1, mutable=["batch_stats"])
    np.testing.assert_allclose(z1, z1b, rtol=1e-6)
    # Concatenating the views would pool their statistics: outputs differ.
    (_, z12), _ = model.apply(variables, jnp.concatenate([y1, y2]), mutable=["batch_stats"])
    assert not np.allclose(z12[:4], z1, atol=1e-3)
    # Eval mode needs no mutable collection.
    r_eval, z_eval = model.apply(variables, y1, train=False)
    assert r_eval.shape == (4, 64) and z_eval.shape == (4, 16)


def test_pmap_sync_batchnorm_equals_global_batch():
    """8 devices x 2 images with axis_name == one device with the 16-image global batch
    (pmap, shard_map)."""
    n = jax.local_device_count()
    assert n == 8
    x = normal(0, (2 * n, 8, 8, 3)) * 2 + 0.5

    def make(axis_name):
        backbone = models.create("resnet18", width=8, stem="cifar", axis_name=axis_name)
        return models.BarlowTwinsModel(backbone, models.Projector("32-16", axis_name=axis_name))

    variables = make(None).init(key(1), x, train=False)
    # Non-trivial running averages so the update is checked too.
    variables = {
        "params": variables["params"],
        "batch_stats": jax.tree_util.tree_map(lambda v: v + 0.3, variables["batch_stats"]),
    }
    single = make(None)
    (r_ref, z_ref), upd_ref = jax.jit(functools.partial(single.apply, mutable=["batch_stats"]))(
        variables, x
    )

    synced = make("batch")
    step = jax.pmap(
        functools.partial(synced.apply, mutable=["batch_stats"]),
        axis_name="batch",
        in_axes=(None, 0),
    )
    (r, z), upd = step(variables, x.reshape(n, 2, *x.shape[1:]))
    np.testing.assert_allclose(r.reshape(r_ref.shape), r_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(z.reshape(z_ref.shape), z_ref, rtol=1e-4, atol=1e-4)
    for dev in range(n):
        jax.tree_util.tree_map(
            lambda a, b, dev=dev: np.testing.assert_allclose(a[dev], b, rtol=1e-4, atol=1e-5),
            upd,
            upd_ref,
        )
    # The same under shard_map over a mesh of the 8 devices.
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
    P = jax.sharding.PartitionSpec
    sharded = jax.jit(
        jax.shard_map(
            functools.partial(synced.apply, mutable=["batch_stats"]),
            mesh=mesh,
            in_specs=(P(), P("batch")),
            out_specs=((P("batch"), P("batch")), P()),
        )
    )
    (r_s, z_s), upd_s = sharded(variables, x)
    np.testing.assert_allclose(r_s, r_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(z_s, z_ref, rtol=1e-4, atol=1e-4)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), upd_s, upd_ref
    )
    # Without axis_name each device would normalise its own 2 images: clearly different.
    local = jax.pmap(functools.partial(single.apply, mutable=["batch_stats"]), in_axes=(None, 0))
    (_, z_local), _ = local(variables, x.reshape(n, 2, *x.shape[1:]))
    assert not np.allclose(z_local.reshape(z_ref.shape), z_ref, atol=1e-2)


def test_bfloat16_forward_close_to_float32():
    x = normal(0, (8, 16, 16, 3))
    f32 = models.create("resnet18", width=16, stem="cifar")
    bf16 = models.create("resnet18", width=16, stem="cifar", dtype="bfloat16")
    variables = f32.init(key(1), x, train=False)
    # Parameters stay float32 under a bfloat16 computation dtype (same tree, same dtypes).
    shapes_bf16 = jax.eval_shape(
        functools.partial(bf16.init, train=False), jax.random.PRNGKey(1), x
    )
    assert jax.tree_util.tree_map(
        lambda a: (a.shape, a.dtype), shapes_bf16
    ) == jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), variables)

    def rel(a, b):
        assert a.dtype == jnp.float32 and np.all(np.isfinite(a))
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    for train in (True, False):
        r32, _ = f32.apply(variables, x, train=train, mutable=["batch_stats"])
        r16, _ = bf16.apply(variables, x, train=train, mutable=["batch_stats"])
        assert rel(r16, r32) < 0.03, (train, rel(r16, r32))
    # The projector on the same input. (Chained after a bf16 backbone, the embedding error grows:
    # at random init the representation barely varies over the batch, and the projector's
    # BatchNorm divides by that small spread.)
    h = normal(2, (8, 64))
    proj32, proj16 = models.Projector("64-32"), models.Projector("64-32", dtype="bfloat16")
    pv = proj32.init(key(3), h)
    z32, _ = proj32.apply(pv, h, mutable=["batch_stats"])
    z16, _ = proj16.apply(pv, h, mutable=["batch_stats"])
    assert rel(z16, z32) < 0.03
