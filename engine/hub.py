"""Hub ids (`owner/name`) where a local directory is expected: models and tokenizers load by id through
transformers' `from_pretrained`, which reads the local HF cache (HF_HOME) and honours HF_HUB_OFFLINE.

At config load (before any process group) an id must be usable: in the cache, or downloadable (not offline).
Offline and not cached is a user error naming the id, the cache and how to fill it.
"""

from __future__ import annotations

import re
from pathlib import Path

# `name` or `owner/name` as the hub spells them; a path that exists is always read as a path.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def is_hub_id(name: str) -> bool:
    """Whether `name`, which is not an existing path, reads as a hub repository id."""
    return not Path(name).exists() and bool(HUB_ID.match(name))


def cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot directory of `repo_id` (its config.json's folder), or None when not cached."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(found, str):  # None (not cached) or the "cached as missing" sentinel
        found = try_to_load_from_cache(repo_id, "tokenizer_config.json")
    return Path(found).parent if isinstance(found, str) else None


def check_hub_id(repo_id: str, what: str) -> Path | None:
    """ValueError unless `repo_id` can be loaded here: its cached snapshot, or None when it will be downloaded."""
    from huggingface_hub import constants

    snapshot = cached_snapshot(repo_id)
    if snapshot is not None:
        return snapshot
    if not constants.HF_HUB_OFFLINE:
        _check_exists(repo_id, what)
        return None
    raise ValueError(
        f"{what}: {repo_id!r} is not a local directory, and as a hub id it is not in the HF cache "
        f"({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE is set; download it where there is network "
        f"(`hf download {repo_id}` with the same HF_HOME) or set {what} to a local directory"
    )


def _check_exists(repo_id: str, what: str) -> None:
    """Online: a mistyped local path reads as a hub id too, and would fail only when the ranks load it."""
    from huggingface_hub import repo_exists

    try:
        exists = repo_exists(repo_id)
    except Exception:  # no network after all, a proxy, a gated repo: from_pretrained will say what it is
        return
    if not exists:
        raise ValueError(
            f"{what}: {repo_id!r} is neither a local directory nor a repository on the hub (a mistyped path?)"
        )
