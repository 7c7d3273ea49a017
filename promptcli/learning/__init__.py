"""Learning: the training loop and tune pipeline, losses, and the optimal-transport clean/noisy split."""
