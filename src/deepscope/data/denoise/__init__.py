"""Denoising data: noisy/clean image sets, synthetic noise and Noise2Void's blind-spot masking."""
