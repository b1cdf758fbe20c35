"""Self-supervised representation learning (SimCLR, VICReg), its probes and pictures."""
