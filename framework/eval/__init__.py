from framework.eval.metrics import evaluate_causal_lm, evaluate_encoder
from framework.eval.resources import Measurement, measure

__all__ = ["Measurement", "evaluate_causal_lm", "evaluate_encoder", "measure"]
