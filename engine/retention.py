"""Checkpoint retention: checkpoint.keep_last and checkpoint.keep_best.

After each save, rank 0 deletes the complete checkpoints (global_step* directories) that are neither among
the newest keep_last nor, with keep_best, the one with the lowest eval loss. Never touched: the newest
complete checkpoint (what `latest` names and a resume picks), anything else in the directory (tmp.* saves
in progress, export/, `latest`), and checkpoints without a step in their name.

Each checkpoint's eval loss is recorded in checkpoint.dir/eval_losses.json ({tag: loss}), written
atomically before the pruning, so a resumed run still knows the best checkpoint of the runs before it. A
deleted checkpoint is first renamed to tmp.old.<tag> (one of the save temporaries: nothing reads it and the
next save removes a leftover), so a crash during the removal never leaves a half-deleted global_step*.
No entry is reached through a symbolic link (engine/safe_paths.py), as in the saves themselves.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from engine.checkpoint import TAG_RE, TMP_PREFIX, is_own_tag_dir, read_latest
from engine.safe_paths import entry, is_regular, read_small, write_small

SCORES_FILE = "eval_losses.json"
_WHAT = "checkpoint.dir"


def read_scores(ckpt_dir: str | Path) -> dict[str, float]:
    text = read_small(entry(Path(ckpt_dir), SCORES_FILE, _WHAT), _WHAT, limit=1 << 20)
    try:
        data = json.loads(text) if text else {}
    except ValueError:
        data = {}  # cut short by a crash: keep_best then has no scores, and keep_last alone decides
    if not isinstance(data, dict):
        return {}
    return {str(k): float(v) for k, v in data.items() if isinstance(v, (int, float))}


def _write_scores(root: Path, scores: dict[str, float]) -> None:
    tmp = entry(root, TMP_PREFIX + SCORES_FILE, _WHAT)
    if is_regular(tmp):
        os.unlink(tmp)
    write_small(tmp, json.dumps(scores, indent=1, sort_keys=True, allow_nan=True))
    os.replace(tmp, entry(root, SCORES_FILE, _WHAT))


def record_score(ckpt_dir: str | Path, tag: str, loss: float) -> None:
    """Remember `tag`'s eval loss (rank 0, after the checkpoint is committed)."""
    root = Path(ckpt_dir)
    _write_scores(root, {**read_scores(root), tag: loss})


def to_delete(
    tags: list[str],
    keep_last: int,
    keep_best: bool,
    scores: dict[str, float],
    protect: frozenset[str] = frozenset(),
) -> list[str]:
    """The tags of `tags` (complete checkpoints) that retention removes; `protect` (the checkpoint just
    saved, the one `latest` names) is kept whatever its step. Pure, for the tests."""
    by_step = sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))
    keep = set(by_step[-keep_last:]) | set(protect)  # keep_last >= 1: the newest is always among them
    if keep_best:
        scored = [t for t in by_step if math.isfinite(scores.get(t, math.nan))]
        if scored:
            keep.add(min(scored, key=lambda t: (scores[t], -int(TAG_RE.match(t).group(1)))))
    return [t for t in by_step if t not in keep]


def prune(ckpt_dir: str | Path, keep_last: int | None, keep_best: bool, saved: str) -> list[str]:
    """Apply the retention to `ckpt_dir` (rank 0 only, after the save of tag `saved` was committed);
    returns the deleted tags. Only complete checkpoints count and go (a resumed run may have saved an
    older step than others in the directory: `saved` and `latest`'s tag stay all the same)."""
    if keep_last is None:
        return []
    root = Path(ckpt_dir)
    tags = [p.name for p in root.iterdir() if TAG_RE.match(p.name) and is_own_tag_dir(root, p.name)]
    latest = read_latest(root)
    protect = frozenset({saved, *([latest] if latest else [])})
    doomed = to_delete(tags, keep_last, keep_best, read_scores(root) if keep_best else {}, protect)
    for tag in doomed:
        aside = entry(root, f"{TMP_PREFIX}old.{tag}", _WHAT)
        if aside.exists():
            shutil.rmtree(aside)
        os.rename(entry(root, tag, _WHAT), aside)
        shutil.rmtree(aside, ignore_errors=True)
    scores = read_scores(root)
    if any(t in scores for t in doomed):
        _write_scores(root, {t: v for t, v in scores.items() if t not in doomed})
    return doomed
