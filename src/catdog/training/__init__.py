"""Model training: backbones, data module, Lightning module and the checkpoint loader."""

import os

# Albumentations otherwise asks PyPI for a newer version on import (slow, and the pipeline may be offline).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
