"""Models: open_clip loading, the offline demo model, zero-shot classifiers, prompt learners and heads."""
