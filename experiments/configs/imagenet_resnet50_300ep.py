"""The paper's ablation baseline: the ImageNet ResNet-50 recipe for 300 epochs (71.4% top-1)."""

from experiments.configs import imagenet_resnet50


def get_config():
    config = imagenet_resnet50.get_config()
    config.num_epochs = 300
    return config
