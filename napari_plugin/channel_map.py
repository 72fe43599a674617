"""Which image layer (or channel of a layer) feeds which model channel.

Sources are named as the widget shows them: a single-channel layer by its layer name, a
channel of a multichannel layer as ``"layer [i]"``. A model channel is mapped to one source,
left out on purpose (:data:`LEAVE_OUT`, for models that take channel subsets), or not mapped
(:data:`UNMAPPED`), which is an error at run time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from cellvit_ssl.channels import canonical_name
from cellvit_ssl.errors import DataError

UNMAPPED = "(not mapped)"
LEAVE_OUT = "(leave out)"


def _canonical_or_none(name: str) -> str | None:
    try:
        return canonical_name(name)
    except DataError:
        return None


def source_channel(source: str) -> str | None:
    """The vocabulary channel a source name refers to, if its name (or a word in it) says so.

    ``"nucleus"``, ``"DAPI"``, ``"field_000 [Hoechst]"`` and ``"ER-stain"`` are recognised.
    """
    found = _canonical_or_none(source)
    if found:
        return found
    for word in re.split(r"[^A-Za-z0-9]+", source):
        found = _canonical_or_none(word) if word else None
        if found:
            return found
    return None


def suggest_mapping(model_channels: Sequence[str], sources: Sequence[str]) -> dict[str, str]:
    """Pre-fill the mapping by name: each model channel gets the first source that names it.

    Returns:
        ``{model channel: source name or UNMAPPED}``.
    """
    taken: set[str] = set()
    mapping = {}
    for channel in model_channels:
        choice = UNMAPPED
        for source in sources:
            if source not in taken and source_channel(source) == channel:
                choice = source
                taken.add(source)
                break
        mapping[channel] = choice
    return mapping


def resolve_mapping(model_channels: Sequence[str], mapping: Mapping[str, str],
                    sources: Sequence[str]) -> tuple[list[str], list[str]]:
    """Check a mapping and return the sources to stack and their model channel names.

    Raises:
        DataError: On a channel mismatch (no source mapped at all), model channels the image
            lacks (unmapped ones), a source used twice or a source that no longer exists.
    """
    chosen = {c: mapping.get(c, UNMAPPED) for c in model_channels}
    used = [(c, s) for c, s in chosen.items() if s not in (UNMAPPED, LEAVE_OUT)]
    if not used:
        raise DataError(
            f"channel mismatch: no image layer is mapped to the model's channels {list(model_channels)}; "
            f"the viewer has {list(sources) or 'no image layers'}. Name the layers after the channels "
            "or pick one per channel in the table."
        )
    missing = [c for c, s in chosen.items() if s == UNMAPPED]
    if missing:
        raise DataError(
            f"the image lacks the model channels {missing}: pick a layer for each in the table, "
            f"or choose {LEAVE_OUT!r} to run without them"
        )
    gone = [s for _, s in used if s not in sources]
    if gone:
        raise DataError(f"image layers {gone} are no longer in the viewer; pick the channels again")
    names = [s for _, s in used]
    twice = sorted({s for s in names if names.count(s) > 1})
    if twice:
        raise DataError(f"image layers {twice} are mapped to more than one model channel")
    return names, [c for c, _ in used]
