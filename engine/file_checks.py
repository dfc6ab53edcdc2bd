"""Cheap up-front checks of input files whose faults the libraries reading them report without naming the
file (or only after the process group started): non-UTF-8 text, malformed JSON, truncated safetensors, a
named pipe or device where a file is expected (opening it would block the start forever), a pickle payload
in a `pytorch_model.bin`.

Each raises ValueError (exit 2) naming the file, and the byte / line / tensor, and what is wrong. Stdlib
only, except the weights-only load of pickled weights (engine/safe_load.py, imported when there are some).
"""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path

_BLOCK = 1 << 20


def check_utf8(file: Path, what: str) -> None:
    """Decode `file` 1 MiB at a time (data files can be large); the first bad byte and its line are named."""
    carry, offset, lines = b"", 0, 0  # carry: a character cut by the block boundary, completed next block
    check_plain_file(file, what)
    with open(file, "rb") as f:
        while True:
            block = f.read(_BLOCK)
            data = carry + block
            try:
                data.decode("utf-8")
                carry = b""
            except UnicodeDecodeError as e:
                if not (block and e.reason == "unexpected end of data" and e.start >= len(data) - 3):
                    line = lines + data[: e.start].count(b"\n") + 1
                    raise ValueError(
                        f"{what} {str(file)!r} is not UTF-8 text: byte {offset + e.start} (line {line}): {e.reason}"
                    ) from None
                carry = data[e.start :]
            done = len(data) - len(carry)
            offset, lines = offset + done, lines + data[:done].count(b"\n")
            if not block:
                return


def check_plain_file(file: Path, what: str) -> None:
    """A regular file (through links): checked before opening, since opening a named pipe blocks."""
    try:
        mode = os.stat(file).st_mode
    except OSError as e:
        raise ValueError(f"{what} {str(file)!r} cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{what} {str(file)!r} is not a regular file (a named pipe, socket or device?)")


def check_plain_files(directory: Path, what: str) -> None:
    """Every entry of `directory` (an HF tokenizer's or model's) is a regular file or a directory: the
    libraries reading it open files by name and would block forever on a named pipe."""
    for file in sorted(directory.iterdir()):
        if not file.is_dir():
            check_plain_file(file, what)


def check_json_files(directory: Path, what: str) -> None:
    """Every *.json in `directory` (an HF tokenizer's or model's files) is UTF-8 and parses as JSON."""
    check_plain_files(directory, what)
    for file in sorted(directory.glob("*.json")):
        check_utf8(file, what)
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} {str(file)!r} is not valid JSON: line {e.lineno}: {e.msg}") from None
    for file in sorted(directory.glob("*.txt")):  # merges.txt, vocab.txt
        check_utf8(file, what)


def check_safetensors(file: Path, what: str) -> None:
    """The header parses and the file is as long as the tensors it declares (a cut-off download or copy)."""
    check_plain_file(file, what)
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(
                f"{what} {str(file)!r} is truncated: {size} bytes, not even a safetensors header"
            )
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(
                f"{what} {str(file)!r} is truncated or not safetensors: {size} bytes, its header claims {n}"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(
                f"{what} {str(file)!r} is corrupt: unreadable safetensors header ({e})"
            ) from None
    if not isinstance(header, dict):
        raise ValueError(f"{what} {str(file)!r} is corrupt: its safetensors header is not a mapping")
    end, last = 0, None
    for name, info in header.items():
        if name != "__metadata__" and isinstance(info, dict):
            offsets = info.get("data_offsets") or [0, 0]
            if int(offsets[1]) > end:
                end, last = int(offsets[1]), name
    if 8 + n + end > size:
        raise ValueError(
            f"{what} {str(file)!r} is truncated: {size} bytes, but its tensors (the last: {last!r}) need "
            f"{8 + n + end}; copy or download it again"
        )


def check_model_dir(directory: Path, what: str) -> None:
    check_json_files(directory, what)
    for file in sorted(directory.glob("*.safetensors")):
        check_safetensors(file, what)
    for file in sorted([*directory.glob("*.bin"), *directory.glob("*.pt"), *directory.glob("*.pth")]):
        check_pickled_weights(file, what)


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def check_has_weights(directory: Path, key: str) -> None:
    """A local model directory holds weight files (transformers says so only after the process group, in
    words that name no key)."""
    if not any(next(directory.glob(p), None) for p in WEIGHT_PATTERNS):
        raise ValueError(
            f"{key}: {str(directory)!r} holds no weights (no *.safetensors, pytorch_model.bin, *.pt or *.pth): "
            "copy them there, or start from a random init with model.hf_config"
        )


def check_pickled_weights(file: Path, what: str) -> None:
    """Pickled weights (pytorch_model.bin) load under the weights-only rules: a payload does not run, and
    the refusal names the file (transformers' own refusal is a traceback naming none)."""
    from engine.safe_load import CheckpointError, load_file

    try:
        load_file(file, mmap=True)
    except CheckpointError as e:
        raise ValueError(f"{what} {str(file)!r}: {e.reason}; it is not loaded") from None
