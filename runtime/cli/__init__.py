"""Appliance-side commands (`doctor`, …): registered on the root `sealbox` app by `sealbox.cli`."""
