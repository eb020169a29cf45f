"""sculpt's core: run orchestration, models, data, evaluation, codecs. Imports no plugin."""

from framework.errors import SculptError

__all__ = ["SculptError"]
