"""Training and fine-tuning with a pure optax train_step."""
from jaxroute.training.train import (
    TrainConfig, TrainState, augment, create_train_state, eval_logits, fit, topk_accuracy, train_step,
)

__all__ = ["TrainConfig", "TrainState", "augment", "create_train_state", "eval_logits", "fit",
           "topk_accuracy", "train_step"]
