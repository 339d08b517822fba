"""Every refusal's exit status comes from the one table, so a script can tell refusals apart."""

from __future__ import annotations

import importlib
import pkgutil

import sealbox.bundler
import sealbox.runtime
from sealbox.runtime.exit_codes import ExitCode


def _error_classes() -> list[type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    wings = [(sealbox.bundler.__path__, "sealbox.bundler."), (sealbox.runtime.__path__, "sealbox.runtime.")]
    for info in (info for path, prefix in wings for info in pkgutil.walk_packages(path, prefix)):
        if info.name.startswith(("sealbox.runtime.vllm", "sealbox.runtime.engine.llama")):
            continue  # loads native code; holds no error class with an exit status
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, BaseException) and "exit_code" in vars(value):
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return list(found.values())


def test_every_error_with_an_exit_status_takes_it_from_the_table() -> None:
    classes = _error_classes()
    assert len(classes) > 20
    for error in classes:
        assert isinstance(vars(error)["exit_code"], ExitCode), f"{error.__qualname__} has a bare exit status"


def test_no_two_refusals_of_different_meaning_share_a_status() -> None:
    by_code: dict[int, set[str]] = {}
    for error in _error_classes():
        by_code.setdefault(int(error.exit_code), set()).add(error.__qualname__)
    shared = {code: names for code, names in by_code.items() if len(names) > 1}
    # the bundle's root class and a digest mismatch are both "integrity"; a bad input file is refused alike whichever
    assert shared == {
        ExitCode.INTEGRITY: {"BundleError", "IntegrityError", "DigestMismatchError"},
        ExitCode.REFUSED: {"InputError", "SuiteError", "AcceleratorError"},
    }
