"""lcbc: language-conditioned behavior cloning and multi-task RL fine-tuning for robot policies.

The names a user needs, imported on first use (so `lcbc --help` stays fast):
LanguagePolicy, DemoDataset, DemoDataModule, BehaviorCloning, Benchmark, load_benchmark,
register_benchmark, rollout.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "LanguagePolicy": "lcbc.policies.language_policy",
    "DemoDataset": "lcbc.data.dataset",
    "DemoDataModule": "lcbc.data.datamodule",
    "BehaviorCloning": "lcbc.training.bc",
    "Benchmark": "lcbc.benchmark",
    "load_benchmark": "lcbc.benchmark",
    "register_benchmark": "lcbc.benchmark",
    "rollout": "lcbc.evaluation.rollout",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'lcbc' has no attribute {name!r}")
