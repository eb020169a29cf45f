"""Training: the trainer config's schema, LightningModules, and the worker that runs them in
one process or several (FSDP2, DeepSpeed ZeRO). Importing this package does not import
Lightning; its modules do, when a training stage runs."""

from framework.lightning.spec import TrainerSpec

__all__ = ["TrainerSpec"]
