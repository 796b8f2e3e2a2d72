"""Training loops, losses, miners, samplers, seeded augmentation, optimizer and schedule."""
