"""Appliance-side commands (`doctor`, …): registered on the root `sealbox` app by `bundler.cli._register`."""
