"""User-facing errors: the CLI prints these as one plain message, without a traceback."""

from __future__ import annotations


class CxrtuneError(Exception):
    """An error the user can fix: the message names the file or key at fault and how to fix it."""


class ManifestError(CxrtuneError):
    """A manifest failed validation; ``problems`` lists every bad row, not just the first."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        shown = "\n".join(f"  - {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"manifest {source} has {len(problems)} problem(s):\n{shown}{more}")


class ImageDecodeError(CxrtuneError):
    """A file could not be decoded as a chest radiograph (corrupt, truncated, wrong type)."""


class ImageTooLargeError(CxrtuneError):
    """A file exceeds the configured byte or pixel limit."""


class UnsupportedFormatError(CxrtuneError):
    """A file is not PNG, JPEG or DICOM."""


# how the served scorer's 422 for an image it cannot decode begins (not a refusal by the rules:
# the PACS listener parks such an instance instead of dropping it)
DECODE_FAILURE = "cannot decode the image"
# how its 503 for a request under which stage replicas died begins: the input may be what kills
# them, so the PACS listener counts it against that instance instead of waiting on it for ever
REPLICA_FAILED = "a scoring replica failed"


class InputRefused(CxrtuneError):
    """A readable image that the scoring rules refuse (too small, blank, a colour photograph, a
    DICOM excluded by the rules). Over HTTP: 422."""
