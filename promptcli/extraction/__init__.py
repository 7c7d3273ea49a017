"""Image-feature extraction: one process (``extract``) or many (``distributed``)."""
