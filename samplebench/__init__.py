"""samplebench: benchmark diffusion and flow model samplers."""

__version__ = "0.1.0"
