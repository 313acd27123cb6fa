"""rtdmd: Reward-Tilted Distribution Matching Distillation, reference trainer and benchmark harness."""

__version__ = "0.1.0"
