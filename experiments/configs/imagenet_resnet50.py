"""The paper's run: ImageNet, ResNet-50, projector 8192-8192-8192, batch 2048, 1000 epochs, LARS.

    python -m bt_jax.train --config=experiments/configs/imagenet_resnet50.py --workdir=runs/in1k

ImageNet must be prepared for tensorflow-datasets first (its manual download), ideally as
array_record so that it is read from disk by index (see README, Data). Paper: 73.2% linear top-1.
The optimiser is the default group: the official LARS recipe (bt_jax.optim.lars).
"""

from bt_jax.config import get_config as base_config


def get_config():
    config = base_config()
    config.batch_size = 2048
    config.num_epochs = 1000
    config.data.dataset = "imagenet2012"
    config.data.image_size = 224
    config.data.eval_resize = 256  # resize 256, centre crop 224
    config.model.name = "resnet50"
    config.model.stem = "imagenet"
    config.model.width = 64
    config.model.projector = "8192-8192-8192"
    config.model.dtype = "bfloat16"  # the official run used mixed precision; loss and C float32
    config.checkpoint.every_steps = 625  # one epoch of 1,281,167 / 2048
    config.checkpoint.keep = 3
    config.logging.every_steps = 50
    config.logging.correlation_image_dims = 256
    return config
