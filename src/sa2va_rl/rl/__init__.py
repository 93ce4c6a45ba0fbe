"""The RL layer: TRL's GRPOTrainer at its seams, the stability callback, rewards."""
