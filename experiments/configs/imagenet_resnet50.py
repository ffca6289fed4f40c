"""The paper's run: ImageNet, ResNet-50, projector 8192-8192-8192, batch 2048, 1000 epochs, LARS.

    python -m bt_jax.train --config=experiments/configs/imagenet_resnet50.py --workdir=runs/in1k

ImageNet must be prepared for tensorflow-datasets first (its manual download), ideally as
array_record so that it is read from disk by index (see README, Data). Paper: 73.2% linear top-1.
"""
from bt_jax.config import get_config as base_config


def get_config():
    config = base_config()
    config.dataset = "imagenet2012"
    config.image_size = 224
    config.eval_resize = 256  # resize 256, centre crop 224
    config.min_crop_scale = 0.08
    config.batch_size = 2048
    config.num_epochs = 1000
    config.warmup_epochs = 10
    config.model = "resnet50"
    config.stem = "imagenet"
    config.width = 64
    config.zero_init_residual = True
    config.projector = "8192-8192-8192"
    config.dtype = "bfloat16"  # the official run used mixed precision; loss and C stay float32
    config.lambd = 0.0051
    config.learning_rate_weights = 0.2
    config.learning_rate_biases = 0.0048
    config.weight_decay = 1.5e-6
    config.checkpoint_every_steps = 625  # one epoch of 1,281,167 / 2048
    config.keep_checkpoints = 3
    config.log_every_steps = 50
    config.correlation_image_dims = 256
    return config
