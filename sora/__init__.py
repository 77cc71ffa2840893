"""sora: the model library (pure PyTorch/NumPy).

Video I/O, buckets, the shapes world, the video compression network (VAE),
spacetime patches, text encoders, the diffusion transformer, flow matching and
samplers. This layer never imports ray or prefect (see docs/architecture.md, "Layers").
"""

__version__ = "0.1.0"
