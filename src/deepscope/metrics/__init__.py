"""Metrics, built on torchmetrics so they synchronise across data-parallel processes."""
