"""The age model: what an image becomes for it (backbones.py), its Keras networks (keras_networks.py), fitting
and splits (training.py), reading and scoring its answers (estimates.py), and saved models (saved_models.py)."""
