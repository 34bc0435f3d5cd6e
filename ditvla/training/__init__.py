"""Training: the loop (``trainer``: ``TrainConfig``, ``train``) and its checkpoints
(``checkpoints``: safetensors + JSON, written atomically, resumable exactly)."""
