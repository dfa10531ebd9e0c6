"""Data: image files read safely (image_files.py), datasets and their labels (datasets.py), age groups
(age_groups.py), and the words the CSVs share (vocabulary.py)."""
