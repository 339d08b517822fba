"""A stand-in for vLLM in sealbox's tests (no GPU here): the module layout and the API server's command line and
HTTP surface that sealbox relies on, nothing else. Never installed outside a test's own interpreter path."""

__version__ = "0.0.0+sealbox.standin"
