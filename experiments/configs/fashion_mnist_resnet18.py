"""Fashion-MNIST from Debian's `dataset-fashion-mnist` IDX files: ResNet-18 (width 16), 28 px.

    apt-get install -y dataset-fashion-mnist
    python -m bt_jax.train --config=experiments/configs/fashion_mnist_resnet18.py \
        --workdir=runs/fashion_mnist

Sized for a 2-core CPU machine (about an hour); on an accelerator raise width to 64 and epochs.
"""
from bt_jax.config import get_config as base_config


def get_config():
    config = base_config()
    config.dataset = "idx"
    config.data_dir = "/usr/share/datasets/fashion-mnist"
    config.image_size = 28  # The native resolution: no upsampling cost.
    config.eval_resize = 28
    # 8% of a 28 px image is an 8 px crop: too little of a garment to match its twin.
    config.min_crop_scale = 0.2
    config.batch_size = 256
    config.num_epochs = 12
    config.warmup_epochs = 1
    config.width = 16
    config.projector = "1024-1024-1024"
    config.checkpoint_every_steps = 234  # One epoch of 60,000 / 256.
    config.keep_checkpoints = 100  # Every epoch stays, for the accuracy-over-epochs curve.
    config.log_every_steps = 20
    return config
