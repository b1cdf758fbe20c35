"""Denoising: Noise2Void, Noise2Noise and supervised noisy-to-clean U-Nets."""
