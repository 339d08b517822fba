"""sealbox: carry local LLMs into air-gapped hosts in signed bundles and serve them there under lock.

The two wings install under this namespace: `sealbox.bundler` (the bundle side) and `sealbox.runtime` (the
appliance), with `sealbox.policies` as data. This package itself holds only the command-line root.
"""
