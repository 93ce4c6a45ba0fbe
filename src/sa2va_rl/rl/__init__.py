"""The RL layer: TRL's GRPOTrainer at its seams, checkpoints and rollback, the stability callback, rewards."""
