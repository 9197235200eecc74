"""Rewriting a base cache's meta.json as another approxtune (or installation) would have written it."""

import json
from pathlib import Path

from approxtune.cache import CacheMeta, _file_checksum, cache_fingerprint


def rewrite_meta(cache: Path, **changes) -> dict:
    """Change ``meta.json``'s values and seal it again (its own checksum recomputed): a consistent cache of other
    settings, not a damaged one.  Returns the previous contents."""
    file = cache / "meta.json"
    before = json.loads(file.read_text())
    data = {**before, **changes}
    checksums = dict(data.pop("checksums"))
    checksums["meta"] = cache_fingerprint(CacheMeta(**data))
    file.write_text(json.dumps({**data, "checksums": checksums}, indent=2, sort_keys=True))
    return before


def as_format_1(cache_or_partial: Path) -> None:
    """Rewrite a meta.json as approxtune wrote it before format 2 (torch's noise, no noise fields, no checksums)."""
    file = cache_or_partial / "meta.json"
    data = json.loads(file.read_text())
    for key in ("noise_generator", "noise_canary", "checksums"):
        data.pop(key, None)
    file.write_text(json.dumps({**data, "format_version": 1}))


def reseal(cache: Path, name: str) -> None:
    """Record the checksum of the array file ``name`` as it is now (a cache written with that array, by a buggy or
    foreign writer: the checksums vouch for the bytes, not for what they mean)."""
    file = cache / "meta.json"
    data = json.loads(file.read_text())
    data["checksums"][name] = _file_checksum(cache / name)
    file.write_text(json.dumps(data, indent=2, sort_keys=True))
