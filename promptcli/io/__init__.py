"""Data in and out: safe writing, the features/labels/prompt file formats, image lists, provenance."""
