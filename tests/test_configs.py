"""Every recipe loads and passes the checks; the config groups, their checks and the old layout."""

import importlib
import json

import pytest

from bt_jax import config as config_lib
from bt_jax import saved_config
from experiments.configs import ablations

RECIPES = [
    "default",
    "fashion_mnist_resnet18",
    "cifar10_resnet18",
    "imagenet_resnet50",
    "imagenet_resnet50_300ep",
]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_is_valid(name):
    config = importlib.import_module(f"experiments.configs.{name}").get_config()
    config_lib.validate(config)
    config_lib.check_run(config, device_count=8, num_train=1_281_167)


def test_paper_recipe_values():
    from experiments.configs import imagenet_resnet50

    config = imagenet_resnet50.get_config()
    assert (config.batch_size, config.num_epochs, config.model.projector, config.loss.lambd) == (
        2048,
        1000,
        "8192-8192-8192",
        0.0051,
    )
    assert (
        config.optim.learning_rate_weights,
        config.optim.learning_rate_biases,
        config.optim.weight_decay,
    ) == (0.2, 0.0048, 1.5e-6)


@pytest.mark.parametrize("key", sorted(ablations.SWEEPS))
def test_every_ablation_run_is_valid(key):
    for value in ablations.SWEEPS[key]:
        config = ablations.get_config(f"{key}={value}")
        config_lib.validate(config)
        assert config.num_epochs == 300


def test_batch_ablation_uses_the_official_learning_rates():
    config = ablations.get_config("batch_size=256")
    assert config.optim.learning_rate_weights == 0.4
    assert config.optim.learning_rate_biases == pytest.approx(0.024 * 0.4)
    with pytest.raises(ValueError, match="No official learning rate"):
        ablations.get_config("batch_size=300")
    with pytest.raises(ValueError, match="Unknown ablation"):
        ablations.get_config("depth=101")


def test_groups_are_taken_whole_by_their_constructors():
    from bt_jax import models, optim

    config = config_lib.get_config()
    model = models.create_model(**config.model)
    assert model.backbone.width == 16 and model.projector.spec == "512-512-512"
    optim.lars(**config.optim, global_batch=256, steps_per_epoch=5, num_epochs=100)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("data.eval_resize", 8, "eval_resize=8.*>= data.image_size"),
        ("data.image_size", 4, "image_size=4.*at least"),
        ("optim.learning_rate_weights", 0.0, "learning_rate_weights=0.0.*> 0"),
        ("optim.learning_rate_biases", float("nan"), "learning_rate_biases=nan"),
        ("optim.momentum", 1.0, "config.optim: momentum"),
        ("optim.warmup_epochs", 500, "config.optim: warmup_epochs"),
        ("loss.lambd", float("nan"), "lambd=nan"),
        ("loss.method", "fast", "loss.method"),
        ("model.name", "resnet7", "model.name='resnet7'.*resnet18"),
        ("model.projector", "512-x", "model.projector"),
        ("data.photometric", "gpu", "data.photometric"),
        ("max_steps", 0, "max_steps"),
        ("eval.data_dir", "/tmp/x", "eval.data_dir.*eval.dataset"),
    ],
)
def test_every_bad_value_is_one_config_error_naming_the_key(key, value, match):
    config = config_lib.get_config()
    config_lib.set_dotted(config, key, value)
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.validate(config)


def test_unknown_key_and_run_checks():
    config = config_lib.get_config()
    config.batchsize = 64  # a typo of batch_size: must not be silently ignored
    with pytest.raises(config_lib.ConfigError, match="batchsize"):
        config_lib.validate(config)
    config = config_lib.get_config()
    with pytest.raises(config_lib.ConfigError, match="batch_size=256.*3 devices.*255"):
        config_lib.check_run(config, device_count=3, num_train=1500)
    with pytest.raises(config_lib.ConfigError, match="larger than the 100 training examples"):
        config_lib.check_run(config, device_count=8, num_train=100)


def test_a_run_written_in_the_flat_layout_is_mapped_onto_the_groups():
    flat = {
        "seed": 3,
        "dataset": "idx",
        "data_dir": "/d",
        "image_size": 28,
        "model": "resnet34",
        "width": 8,
        "projector": "64-64",
        "lambd": 0.01,
        "loss_method": "gram",
        "learning_rate_weights": 0.3,
        "warmup_epochs": 2,
        "online_probe": False,
        "keep_checkpoints": 5,
        "log_every_steps": 7,
        "blur_probabilities": [1.0, 0.5],
        "eval": {"knn_k": 20},
    }
    config = saved_config.from_saved(json.loads(json.dumps(flat)), where="config.json")
    assert (config.seed, config.data.dataset, config.data.image_size) == (3, "idx", 28)
    assert (config.model.name, config.model.width, config.model.projector) == (
        "resnet34",
        8,
        "64-64",
    )
    assert (config.loss.lambd, config.loss.method, config.optim.learning_rate_weights) == (
        0.01,
        "gram",
        0.3,
    )
    assert (config.probe.enabled, config.checkpoint.keep, config.logging.every_steps) == (
        False,
        5,
        7,
    )
    assert config.data.blur_probabilities == (1.0, 0.5) and config.eval.knn_k == 20
    assert config.model.stem == "cifar"  # a key the run lacks keeps today's default
    with pytest.raises(config_lib.ConfigError, match="config.no_such_key"):
        saved_config.from_saved({**flat, "no_such_key": 1}, where="config.json")
