"""sslnb: self-supervised visual representation learning on CIFAR, step by step."""
__version__ = "0.1.0"
