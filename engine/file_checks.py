"""Cheap up-front checks of input files whose faults the libraries reading them report without naming the
file (or only after the process group started): non-UTF-8 text, malformed JSON, truncated safetensors.

Each raises ValueError (exit 2) naming the file, and the byte / line / tensor, and what is wrong. Stdlib only.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

_BLOCK = 1 << 20


def check_utf8(file: Path, what: str) -> None:
    """Decode `file` 1 MiB at a time (data files can be large); the first bad byte and its line are named."""
    carry, offset, lines = b"", 0, 0  # carry: a character cut by the block boundary, completed next block
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


def check_json_files(directory: Path, what: str) -> None:
    """Every *.json in `directory` (an HF tokenizer's or model's files) is UTF-8 and parses as JSON."""
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
