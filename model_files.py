"""What train_model.py stores inside a .keras file beside Keras' own files, read back without TensorFlow
(prediction reads it before starting its worker pool, which must fork before TensorFlow loads)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from errors import UserError

METADATA_ENTRY = "agepipe.json"  # stored inside the .keras zip, beside Keras' own files


def read_model_metadata(path: str | os.PathLike) -> dict:
    """The metadata train_model.py stores inside a .keras file (read without TensorFlow), or UserError."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {path} not found")
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read(METADATA_ENTRY))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError):
        raise UserError(f"model file {path} was not saved by train_model.py (no {METADATA_ENTRY} inside)") from None


# --------------------------------------------------------------------------------------------------
