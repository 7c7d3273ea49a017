"""Label noise: controlled corruption, zero-shot pseudo-labels, and detecting and cleaning noisy labels."""
