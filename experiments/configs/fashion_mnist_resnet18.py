"""Fashion-MNIST from Debian's `dataset-fashion-mnist` IDX files: ResNet-18 (width 16), 28 px.

    apt-get install -y dataset-fashion-mnist
    python -m bt_jax.train --config=experiments/configs/fashion_mnist_resnet18.py \
        --workdir=runs/fashion_mnist

Sized for a 2-core CPU machine (about an hour); on an accelerator raise width to 64 and epochs.
"""

from bt_jax.config import get_config as base_config


def get_config():
    config = base_config()
    config.data.dataset = "idx"
    config.data.data_dir = "/usr/share/datasets/fashion-mnist"
    config.data.image_size = 28  # The native resolution: no upsampling cost.
    config.data.eval_resize = 28
    # 8% of a 28 px image is an 8 px crop: too little of a garment to match its twin.
    config.data.min_crop_scale = 0.2
    config.num_epochs = 12
    config.optim.warmup_epochs = 1
    config.model.projector = "1024-1024-1024"
    config.checkpoint.every_steps = 234  # One epoch of 60,000 / 256.
    config.checkpoint.keep = 100  # Every epoch stays, for the accuracy-over-epochs curve.
    config.logging.every_steps = 20
    return config
