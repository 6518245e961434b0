"""Caps on what enters the pipeline, so hostile or careless input fails fast with one line.

Every limit here is checked where the input enters (the manifest loader, the input-file
reader, the Scenario client), before anything is paid for or stored. See the README,
"What is refused, and why".
"""

from __future__ import annotations

from typing import Any

# -- manifests ------------------------------------------------------------------------
MAX_MANIFEST_BYTES = 16 * 1024 * 1024  # checked before parsing
MAX_YAML_DEPTH = 64  # nested mappings and lists
MAX_ALIAS_NODES = 100_000  # values produced by expanding aliases (an alias bomb stops here)
MAX_NUMBER_CHARS = 100  # a YAML number longer than this is refused, never converted
MAX_CONTROL_PROBLEMS = 20  # lines reported for raw control characters

# -- input images -----------------------------------------------------------------------
MAX_INPUT_BYTES = 50 * 1000 * 1000
# Larger inputs go through POST /uploads (multipart): a JSON data URL of them would be
# refused with 413 (Scenario's limit is ~6 MB per request; base64 grows bytes by 4/3).
DIRECT_UPLOAD_MAX_BYTES = 4 * 1024 * 1024
UPLOAD_PART_BYTES = 8 * 1024 * 1024  # S3's minimum part size is 5 MiB (except the last)

# -- downloads --------------------------------------------------------------------------
MAX_DOWNLOAD_BYTES = 200 * 1000 * 1000
MAX_REDIRECTS = 5

# -- tool parameters ----------------------------------------------------------------------
SLICER = "model_scenario-image-slicer"
UPSCALER = "model_upscale-v3"
MAX_SUBDIVISIONS = 6
UPSCALE_FACTORS = (2, 4, 8, 16)
MAX_JSON_INT = 2**53 - 1  # larger integers lose precision as JSON numbers


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def param_problem(model: object, key: str, value: Any) -> str | None:
    """Why a model input is out of its sane bounds, or None (checked before any key renders)."""
    if value is None:
        return None
    if model == SLICER and key in ("xSubdivisions", "ySubdivisions"):
        if not _is_int(value):
            return f"expected an integer 1..{MAX_SUBDIVISIONS}, got {type(value).__name__}"
        if not 1 <= value <= MAX_SUBDIVISIONS:
            return f"must be between 1 and {MAX_SUBDIVISIONS}, got {_number(value)}"
    if model == UPSCALER and key == "upscaleFactor" and value not in UPSCALE_FACTORS:
        allowed = ", ".join(map(str, UPSCALE_FACTORS))
        if not _is_int(value) and not isinstance(value, float):
            return f"must be one of {allowed}, got {type(value).__name__}"
        return f"must be one of {allowed}, got {_number(value)}"
    return _huge_int_problem(value)


def _huge_int_problem(value: Any) -> str | None:
    """Integers anywhere in a param value must fit a JSON number exactly."""
    if _is_int(value):
        if abs(value) > MAX_JSON_INT:
            return f"integer {_number(value)} is too large; at most {MAX_JSON_INT}"
        return None
    if isinstance(value, list):
        return next((p for p in map(_huge_int_problem, value) if p), None)
    if isinstance(value, dict):
        return next((p for p in map(_huge_int_problem, value.values()) if p), None)
    return None


def _number(value: int | float) -> str:
    if isinstance(value, int) and value.bit_length() > 200:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
