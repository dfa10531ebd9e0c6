"""Configuration: the YAML files of configs/ and --set read, bounded and validated (loading.py) against one
pydantic model per file (schema.py, data_stages.py, model_stages.py)."""
