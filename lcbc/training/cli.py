"""`lcbc fit | validate | test --config configs/x.yaml`: LightningCLI over BehaviorCloning and DemoDataModule."""

from __future__ import annotations

import sys

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI

from lcbc.data.datamodule import DemoDataModule
from lcbc.errors import UserError
from lcbc.training.bc import BehaviorCloning


class LcbcCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The policy declares the windows it needs; the data builds them.
        parser.link_arguments("model.history", "data.history")
        parser.link_arguments("model.action_chunk", "data.action_chunk")


def run_lightning_cli(argv: list[str]) -> LcbcCLI:
    # From the console, LightningCLI reads sys.argv itself (DDP relaunches the same command line).
    args = None if argv == sys.argv[1:] else argv
    try:
        return LcbcCLI(BehaviorCloning, DemoDataModule, args=args, save_config_kwargs={"overwrite": True},
                       auto_configure_optimizers=False)
    except MisconfigurationException as error:  # Lightning's word on a config that cannot run
        raise UserError(str(error).splitlines()[0]) from None
