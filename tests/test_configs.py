"""Every recipe in experiments/configs loads and passes the config checks."""

import importlib

import pytest

from bt_jax import config as config_lib
from experiments.configs import ablations

RECIPES = ["default", "fashion_mnist_resnet18", "cifar10_resnet18", "imagenet_resnet50",
           "imagenet_resnet50_300ep"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_is_valid(name):
    config = importlib.import_module(f"experiments.configs.{name}").get_config()
    config_lib.validate(config, device_count=8)


def test_paper_recipe_values():
    from experiments.configs import imagenet_resnet50
    config = imagenet_resnet50.get_config()
    assert (config.batch_size, config.num_epochs, config.projector, config.lambd) == (
        2048, 1000, "8192-8192-8192", 0.0051)
    assert (config.learning_rate_weights, config.learning_rate_biases, config.weight_decay) == (
        0.2, 0.0048, 1.5e-6)


@pytest.mark.parametrize("key", sorted(ablations.SWEEPS))
def test_every_ablation_run_is_valid(key):
    for value in ablations.SWEEPS[key]:
        config = ablations.get_config(f"{key}={value}")
        config_lib.validate(config, device_count=8)
        assert config.num_epochs == 300


def test_batch_ablation_uses_the_official_learning_rates():
    config = ablations.get_config("batch_size=256")
    assert config.learning_rate_weights == 0.4
    assert config.learning_rate_biases == pytest.approx(0.024 * 0.4)
    with pytest.raises(ValueError, match="No official learning rate"):
        ablations.get_config("batch_size=300")
    with pytest.raises(ValueError, match="Unknown ablation"):
        ablations.get_config("depth=101")
