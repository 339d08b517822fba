"""Every exit status of the `sealbox` command, in one table, so that a script can tell refusals apart.

0 is success. 1 means a check ran and found something wrong (`bundle verify`, `audit verify`, `doctor`, `plan`
when nothing fits). 2 is bad usage (typer's own code for a bad option, a policy that does not load). 10-19 say what
is wrong with a bundle (the `BundleError` tree: the bundle's own fault); 20-39 why the appliance refused an act
(install, rollback, trust, keys, the evaluation gate). Each error class carries its code as `exit_code`.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    """A check ran and found a failure."""
    USAGE = 2
    """A bad option or configuration (a policy that does not load, a size that does not parse)."""
    REFUSED = 3
    """Refused an input before doing anything (`InputError`; `sealbox serve` refusing to start)."""
    KEY_FILE = 4

    # -- 10-19: the bundle is not what its publisher signed ------------------------------------------------------------
    FORMAT = 10
    SIGNATURE = 11
    THRESHOLD = 12
    UNTRUSTED_SIGNER = 13
    EXPIRED = 14
    PATH = 15
    MISSING_FILE = 16
    EXTRA_FILE = 17
    SIZE_MISMATCH = 18
    INTEGRITY = 19
    """A digest mismatch, and any other bundle refusal without a code of its own."""

    # -- 20-39: the appliance refused an act ---------------------------------------------------------------------------
    ROLLBACK = 20
    """An older version, or another bundle name, than the appliance runs."""
    DELTA_BASE = 21
    TRUST_STORE = 22
    RELEASE = 23
    SERVICE_FILES = 24
    VENV = 25
    AUDIT_TRAIL = 26
    RELEASE_CONTENT = 27
    DECLINED = 28
    """A question (downgrade, another bundle name) was not answered yes."""
    FREE_SPACE = 29
    UNTRUSTED_RELEASE = 30
    """`bundle rollback` to a release no key of the trust store signs any more."""
    API_KEY = 31
    EVALUATION_FAILED = 32
    """The release's evaluation suite failed (at install, or `sealbox eval`)."""
    MESH_KEYS = 33
    """A mesh host's certificate or key is not the one the policy's mesh CA issued for it, or unsafe to install."""
