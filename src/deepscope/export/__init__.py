"""Trained networks in formats that run without deepscope (ONNX, TorchScript), and loading them back."""
