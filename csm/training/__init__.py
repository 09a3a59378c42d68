"""Fine-tuning CSM: data preparation, the objective, and training runs on either backend.

    from csm.training import CSMFineTuner, prepare_dataset
"""

from csm.training.config import PRESETS, TrainConfig
from csm.training.data import PreparedDataset, prepare_dataset
from csm.training.examples import Example, Turn
from csm.training.tuner import CSMFineTuner

__all__ = ["CSMFineTuner", "Example", "PRESETS", "PreparedDataset", "TrainConfig", "Turn", "prepare_dataset"]
