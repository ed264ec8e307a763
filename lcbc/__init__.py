"""lcbc: language-conditioned behavior cloning and multi-task RL fine-tuning for robot policies."""

__version__ = "0.1.0"
