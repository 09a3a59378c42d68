"""Fine-tuning CSM: data preparation, the objective, and training runs on either backend."""
