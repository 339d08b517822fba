"""The one rule "these bytes are this part (or this blob)": a pure check fed bytes, with no I/O.

`bundle verify` hashes each part of a bundle, `bundle install` joins parts into the store, and the install re-hashes
what it reuses from the store; all three feed the bytes they read to an `ExpectedBytes` and call `finish`, which
raises the typed error naming the file and the part. Nothing else in the code compares a size or a digest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from sealbox.bundler.errors import DigestMismatchError, SizeMismatchError
from sealbox.bundler.manifest import BlobEntry

WHOLE_BLOB = -1
"""The `part` of an error about a whole blob (the joined parts, or a store copy) rather than one part."""


@dataclass
class ExpectedBytes:
    """What a run of bytes must be: `size` long with sha256 `sha256`. Feed it with `update`, judge with `finish`."""

    file: str
    """The file named in a refusal (bundle-relative part, or the store path)."""
    blob: str
    """The logical path of the blob in the manifest."""
    part: int
    """The part index, or WHOLE_BLOB."""
    label: str
    """How the message names what was read, e.g. `part 0 of 2 of models/tiny.gguf`."""
    size: int
    sha256: str
    _hash: "hashlib._Hash" = field(default_factory=hashlib.sha256, repr=False)
    _seen: int = 0

    @classmethod
    def of_part(cls, entry: BlobEntry, index: int) -> ExpectedBytes:
        part = entry.parts[index]
        name = entry.part_files()[index]
        label = f"part {index} of {len(entry.parts)} of {entry.path}"
        return cls(name, entry.path, index, label, part.size, part.sha256)

    @classmethod
    def of_blob(cls, entry: BlobEntry, file: str, *, what: str = "the parts") -> ExpectedBytes:
        return cls(file, entry.path, WHOLE_BLOB, f"{what} of {entry.path}", entry.size, entry.sha256)

    def update(self, data: memoryview | bytes) -> None:
        self._hash.update(data)
        self._seen += len(data)

    def check_size(self, size: int) -> None:
        """Before reading: a file of another length is refused by its size alone (a truncated copy is named first).

        Raises SizeMismatchError."""
        if size != self.size:
            raise SizeMismatchError(
                f"{self.file}: {self.label} is {size} bytes, the manifest says {self.size}"
                + (" (truncated)" if size < self.size else ""),
                file=self.file,
                blob=self.blob,
                part=self.part,
            )

    def finish(self) -> None:
        """Raises SizeMismatchError or DigestMismatchError unless exactly the signed bytes were fed."""
        if self._seen != self.size:
            raise SizeMismatchError(
                f"{self.file}: {self.label} changed size while being read ({self._seen} bytes, expected {self.size})",
                file=self.file,
                blob=self.blob,
                part=self.part,
            )
        digest = self._hash.hexdigest()
        if digest != self.sha256:
            verdict = (
                f"join to sha256 {digest}, not" if self.label.startswith("the parts of")
                else f"is corrupt: sha256 {digest} is not"
            )  # fmt: skip
            raise DigestMismatchError(
                f"{self.file}: {self.label} {verdict} the signed {self.sha256}",
                file=self.file,
                blob=self.blob,
                part=self.part,
            )
