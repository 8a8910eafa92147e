"""Validation of language instructions, shared by the policy node and the recorder."""
from __future__ import annotations

MAX_INSTRUCTION_CHARS = 512


def validate_instruction(text: str) -> tuple[bool, str, str]:
    """Return (accepted, cleaned instruction, message). Cleaning strips surrounding white space."""
    if not isinstance(text, str):
        return False, "", f"instruction must be a string, got {type(text).__name__}"
    cleaned = text.strip()
    if not cleaned:
        return False, "", "instruction is empty"
    if len(cleaned) > MAX_INSTRUCTION_CHARS:
        return False, "", f"instruction has {len(cleaned)} characters; the limit is {MAX_INSTRUCTION_CHARS}"
    return True, cleaned, f"instruction accepted ({len(cleaned)} characters)"
