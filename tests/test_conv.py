"""bt_jax.models.conv: every form gives XLA's convolution, its values and both gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from convert_helpers import random_variables
from jax import export
from jax.sharding import PartitionSpec as P

from bt_jax import convert, models
from bt_jax.models import conv as conv_lib

# (kernel, stride) of every convolution in the ResNets: cifar stem and 3x3 convs (3, 1), the
# strided 3x3 of stages 2-4 (3, 2), bottleneck 1x1 (1, 1), downsample (1, 2), imagenet stem
# (7, 2); padding kernel // 2 as torchvision's.
RESNET_CONVS = [(3, 1), (3, 2), (1, 1), (1, 2), (7, 2)]


def normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def assert_close(got, want, tolerance=1e-5):
    """Every leaf within ``tolerance`` of the largest |value| of the expected leaf (float32
    sums of hundreds of terms round at ~1e-6 of their magnitude)."""
    chex.assert_trees_all_equal_shapes(got, want)
    # On the host: eager jnp ops would compile a program per leaf shape.
    for g, w in zip(jax.device_get(jax.tree.leaves(got)), jax.device_get(jax.tree.leaves(want))):
        scale = max(float(np.max(np.abs(w))), 1e-30)
        error = float(np.max(np.abs(np.asarray(g, np.float64) - w)))
        assert error <= tolerance * scale, error / scale


def value_and_grads(form, x, kernel, stride, cotangent):
    pad = kernel.shape[0] // 2

    def conv(x_, k_):
        return conv_lib.conv2d(x_, k_, stride, ((pad, pad), (pad, pad)), form)

    y, vjp = jax.vjp(conv, x, kernel)
    return (y, *vjp(cotangent))


@pytest.mark.parametrize("kernel_size,stride", RESNET_CONVS)
@pytest.mark.parametrize("form", ["tap_matmul", "auto"])
@pytest.mark.parametrize("rows_per_chunk", [conv_lib.ROWS_PER_CHUNK, 150])
def test_forms_equal_xla_values_and_gradients(
    form, kernel_size, stride, rows_per_chunk, monkeypatch
):
    # 150 rows: 81-position maps go one image per chunk (several chunks), 25-position maps six.
    monkeypatch.setattr(conv_lib, "ROWS_PER_CHUNK", rows_per_chunk)
    monkeypatch.setattr(conv_lib, "MIN_TAP_MATMUL_POSITIONS", 1)  # auto: tap_matmul on CPU
    x = normal(0, (6, 9, 9, 5))  # odd sides: padding and strides as PyTorch's or not at all
    kernel = normal(1, (kernel_size, kernel_size, 5, 7)) / kernel_size
    cotangent = normal(
        2,
        jax.eval_shape(
            lambda: conv_lib.xla_conv(x, kernel, stride, ((kernel_size // 2,) * 2,) * 2)
        ).shape,
    )
    want = jax.jit(value_and_grads, static_argnums=(0, 3))("xla", x, kernel, stride, cotangent)
    got = jax.jit(value_and_grads, static_argnums=(0, 3))(form, x, kernel, stride, cotangent)
    assert_close(got, want)
    assert float(jnp.max(jnp.abs(want[2]))) > 1.0  # a real kernel gradient, not zeros


def test_kernel_gradient_in_float32_from_bfloat16():
    x, g = normal(0, (4, 8, 8, 3)), normal(1, (4, 8, 8, 6))
    want = conv_lib.kernel_grad_by_taps(x, g, (3, 3), 1, ((1, 1), (1, 1)))
    got = conv_lib.kernel_grad_by_taps(
        x.astype(jnp.bfloat16), g.astype(jnp.bfloat16), (3, 3), 1, ((1, 1), (1, 1))
    )
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05 * float(jnp.max(jnp.abs(want))))


def exported_text(platform: str, side: int) -> str:
    x = jax.ShapeDtypeStruct((2, side, side, 4), jnp.float32)
    kernel = jax.ShapeDtypeStruct((3, 3, 4, 8), jnp.float32)

    def kernel_grad(x, kernel):
        return jax.grad(lambda k: jnp.sum(jnp.square(conv_lib.conv2d(x, k, 1, ((1, 1), (1, 1))))))(
            kernel
        )

    return export.export(jax.jit(kernel_grad), platforms=[platform])(x, kernel).mlir_module()


def test_auto_is_tap_matmul_on_cpu_and_xla_elsewhere():
    # Lowered for each platform without its hardware: the decision is the compiled platform's.
    cpu = exported_text("cpu", 16)
    # The forward convolution, and the kernel gradient as matrix products.
    assert "dot_general" in cpu and cpu.count("stablehlo.convolution") == 1
    for accelerator in ("cuda", "tpu"):
        text = exported_text(accelerator, 16)
        assert "dot_general" not in text and text.count("stablehlo.convolution") == 2
    # Below MIN_TAP_MATMUL_POSITIONS output positions, XLA's kernel gradient on the CPU too.
    small = exported_text("cpu", 4)
    assert "dot_general" not in small and small.count("stablehlo.convolution") == 2


def test_tap_matmul_under_shard_map_with_replicated_kernel():
    # A replicated kernel meets per-device images: the custom gradient's cotangent must have the
    # kernel's type, and autodiff's sum over devices must give the one-device gradient.
    mesh = jax.make_mesh(
        (8,), ("batch",), devices=jax.devices(), axis_types=(jax.sharding.AxisType.Auto,)
    )
    x, kernel = normal(0, (16, 8, 8, 3)), normal(1, (3, 3, 3, 4))

    def loss(form, kernel, x):
        return jnp.sum(jnp.sin(conv_lib.conv2d(x, kernel, 1, ((1, 1), (1, 1)), form)))

    def sharded_grad(form):
        per_device = jax.grad(lambda k, x_: loss(form, k, x_))
        return jax.jit(
            jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("batch")), out_specs=P())
        )(kernel, x)

    want = jax.grad(loss, argnums=1)("xla", kernel, x)
    assert_close(sharded_grad("xla"), want)
    assert_close(sharded_grad("tap_matmul"), want)


@pytest.mark.parametrize("name,stem", [("resnet18", "cifar"), ("resnet50", "imagenet")])
def test_parameter_layout_is_the_same_in_every_form(name, stem):
    images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    trees = [
        jax.eval_shape(
            models.create(name, stem=stem, width=8, conv=form).init, jax.random.key(0), images
        )
        for form in conv_lib.FORMS
    ]
    for tree in trees[1:]:
        chex.assert_trees_all_equal_shapes_and_dtypes(tree, trees[0])
    # ... which is the layout torchvision's weights convert to.
    chex.assert_trees_all_equal_shapes_and_dtypes(
        trees[0], convert.expected_shapes(name, stem=stem, width=8)
    )


def test_torchvision_weights_load_and_train_alike_in_every_form():
    state_dict = convert.flax_to_torchvision(random_variables("resnet18", width=8, stem="cifar"))
    variables = convert.torchvision_to_flax(state_dict)
    images = normal(3, (4, 16, 16, 3))

    def loss_and_grads(form):
        model = models.create("resnet18", stem="cifar", width=8, conv=form)

        def loss(params):
            out, updates = model.apply(
                {**variables, "params": params}, images, train=True, mutable=["batch_stats"]
            )
            return jnp.sum(jnp.square(out)), updates

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

    # "auto" (the default, tap_matmul on the larger maps here) is what the model and train-step
    # tests run; against "xla" here is the form it departs from, every conv in it.
    assert_close(loss_and_grads("tap_matmul"), loss_and_grads("xla"))


def test_unknown_form_is_refused():
    with pytest.raises(ValueError, match="conv must be one of"):
        models.create("resnet18", conv="fast")
