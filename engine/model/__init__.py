"""What a model is: config, per-family math as pure functions, sampling, checkpoint reading, synthetic models."""
