"""CIFAR-10, ResNet-18 with the cifar stem, 32 px (the setting of solo-learn's and lightly's
benchmarks: 92.1% online linear probe after 1000 epochs in solo-learn).

    python -m bt_jax.train --config=experiments/configs/cifar10_resnet18.py --workdir=runs/c10

Needs cifar10 prepared for tensorflow-datasets (`tfds build cifar10`, or a data_dir holding it).
Not yet run to the end in this repository: no accuracy of ours is claimed for it.
"""

from bt_jax.config import get_config as base_config


def get_config():
    config = base_config()
    config.data.dataset = "cifar10"
    config.data.image_size = 32
    config.data.eval_resize = 32
    config.num_epochs = 1000
    config.model.width = 64
    config.model.projector = "2048-2048-2048"
    config.checkpoint.every_steps = 195  # one epoch of 50,000 / 256
    config.checkpoint.keep = 3
    config.logging.every_steps = 50
    return config
