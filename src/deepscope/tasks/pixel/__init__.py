"""Shallow pixel classification from scribbles (filter features + random forest), and a U-Net trained from its labels."""
