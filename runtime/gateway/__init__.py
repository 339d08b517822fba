"""`sealbox gateway`: one front (API keys, fairness, audit) over several engine hosts, each a `sealbox serve`."""
