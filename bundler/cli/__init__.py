"""The bundle side's commands (`keys`, `bundle`, `trust`): registered on the root `sealbox` app by `sealbox.cli`."""
