"""Custom Metal kernels for inference (``kernels/*.metal``), their dispatch from MLX
(``dispatch``) and the CPU emulator that runs them on machines without Metal (``emulator``)."""
