"""Models (Flax NNX): the FLoRAL paper's vision nets and a LLaMA-architecture decoder."""
from fedjax_adapters.models.cnn import CifarCNN
from fedjax_adapters.models.mlp import MLP
from fedjax_adapters.models.registry import MODELS, count_params, get_model
from fedjax_adapters.models.resnet import ResNet
from fedjax_adapters.models.vgg import VGG8

__all__ = ['CifarCNN', 'MLP', 'MODELS', 'count_params', 'get_model', 'ResNet', 'VGG8']
