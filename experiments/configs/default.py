"""The embedded default: scikit-learn's bundled digits, a small ResNet-18, minutes on 2 CPU cores.

`python -m bt_jax.train` with no flags runs this config into ./runs/default.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Data (bt_jax.data).
  config.dataset = "digits"  # digits | fashion_mnist_idx | folder | any tfds name
  config.data_dir = None  # tfds data_dir, IDX folder or image folder, by source
  config.image_size = 32  # training crop side, pixels
  config.min_crop_scale = 0.08  # RandomResizedCrop lower area bound
  config.eval_resize = 32  # evaluation: resize the short side to this, then centre-crop image_size
  config.batch_size = 256  # global batch, over all devices and hosts
  config.num_epochs = 20

  # Model (bt_jax.models).
  config.model = "resnet18"
  config.stem = "cifar"  # cifar: 3x3/1 conv, no pool; imagenet: 7x7/2 conv + max-pool
  config.width = 16  # 64 is the standard ResNet
  config.zero_init_residual = True
  config.projector = "512-512-512"
  config.dtype = "float32"  # computation dtype; parameters and loss stay float32

  # Loss (bt_jax.loss).
  config.lambd = 0.0051
  config.loss_method = "auto"

  # Optimiser (bt_jax.optim): the official LARS recipe.
  config.learning_rate_weights = 0.2  # times global_batch / 256
  config.learning_rate_biases = 0.0048  # times global_batch / 256
  config.weight_decay = 1.5e-6
  config.momentum = 0.9
  config.trust_coefficient = 0.001
  config.warmup_epochs = 10

  # Checkpoints and logging (bt_jax.train).
  config.checkpoint_every_steps = 100
  config.keep_checkpoints = 2
  config.log_every_steps = 10
  return config
