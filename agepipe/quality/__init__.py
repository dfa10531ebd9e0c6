"""Quality: the registered image metrics the checks test (image_metrics.py) and the exact and near-duplicate
search (duplicates.py)."""
