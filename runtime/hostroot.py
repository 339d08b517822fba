"""Where an appliance keeps its state: one directory, `<root>`, laid out the same on every host."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

ROOT_ENV = "SEALBOX_ROOT"
SYSTEM_ROOT = Path("/var/lib/sealbox")


def default_root() -> Path:
    """`$SEALBOX_ROOT`, else /var/lib/sealbox for root, else the user's data dir (development)."""
    if env := os.environ.get(ROOT_ENV):
        return Path(env)
    if os.geteuid() == 0:
        return SYSTEM_ROOT
    return Path(platformdirs.user_data_dir("sealbox"))


@dataclass(frozen=True)
class HostRoot:
    path: Path

    @classmethod
    def resolve(cls, root: Path | None) -> "HostRoot":
        return cls((root or default_root()).absolute())

    @property
    def trust(self) -> Path:
        """Trusted publisher public keys, added by hand, offline."""
        return self.path / "trust"

    @property
    def store(self) -> Path:
        """Content-addressed blobs shared by all releases: store/sha256/<digest>."""
        return self.path / "store" / "sha256"

    @property
    def releases(self) -> Path:
        return self.path / "releases"

    @property
    def current(self) -> Path:
        """Symlink to the live release, switched atomically."""
        return self.path / "current"

    @property
    def audit(self) -> Path:
        return self.path / "audit"

    @property
    def api_keys(self) -> Path:
        return self.path / "api-keys.json"

    @property
    def run(self) -> Path:
        """State of the running server (egress-guard status) that `doctor` reads."""
        return self.path / "run"

    @property
    def calibration(self) -> Path:
        """Which KV cache type and attention kernel each model ran fastest with on this host (`models.calibration`)."""
        return self.run / "calibration"

    @property
    def staging(self) -> Path:
        return self.path / "staging"
