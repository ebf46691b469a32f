"""Model registry (CIFAR ResNets, VGG, MobileNetV2, small CNNs, ``torchvision:<name>``, user builders),
the zoo of test architectures and importing a user's trained model as a base checkpoint."""
from .registry import ModelSpec, create_model

__all__ = ["ModelSpec", "create_model"]
