"""mgbench: the experiment harness for Model-guidance diffusion training."""

__version__ = "0.1.0"
