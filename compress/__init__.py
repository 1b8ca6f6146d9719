"""adc: adversarial diffusion compression for SD-based real-world super-resolution."""

__version__ = "0.2.0"
