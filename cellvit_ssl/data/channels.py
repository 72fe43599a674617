"""Named channel vocabulary shared across datasets.

Every channel that reaches a model is identified by a stable integer id from one global
vocabulary, so ``nucleus`` means the same thing in HPA, WTC-11 and Cell Painting and channels
may arrive in any order or subset. New names are only ever appended, never reordered, so ids
in old checkpoints stay valid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cellvit_ssl.errors import DataError

#: Canonical channel names; the position is the channel id. Append only.
VOCABULARY: tuple[str, ...] = (
    "nucleus",
    "microtubules",
    "er",
    "protein",
    "rna",
    "agp",
    "mito",
    "membrane",
    "actin",
    "golgi",
    "brightfield",
)

#: Common spellings in file metadata, mapped to the canonical name (matched case-insensitively).
ALIASES: dict[str, str] = {
    "dna": "nucleus",
    "dapi": "nucleus",
    "hoechst": "nucleus",
    "nuclei": "nucleus",
    "nuclear": "nucleus",
    "tubulin": "microtubules",
    "microtubule": "microtubules",
    "endoplasmic_reticulum": "er",
    "endoplasmic reticulum": "er",
    "concanavalin": "er",
    "antibody": "protein",
    "target": "protein",
    "structure": "protein",
    "poi": "protein",
    "syto14": "rna",
    "nucleoli": "rna",
    "phalloidin": "agp",
    "wga": "agp",
    "mitochondria": "mito",
    "mitotracker": "mito",
    "cell_membrane": "membrane",
    "cellmask": "membrane",
    "bf": "brightfield",
}

#: Channel names in on-disk order for the datasets the package knows.
PRESETS: dict[str, tuple[str, ...]] = {
    "hpa": ("microtubules", "protein", "nucleus", "er"),
    "wtc11": ("nucleus", "membrane", "protein"),
    "cellpainting": ("nucleus", "rna", "er", "agp", "mito"),
    "demo": ("nucleus", "microtubules", "er", "protein"),
}


def canonical_name(name: str, mapping: Mapping[str, str] | None = None) -> str:
    """Return the canonical vocabulary name for a channel name found in data or config.

    Args:
        name: A channel name as written in file metadata or by a user (any case).
        mapping: Optional user mapping from their own names to vocabulary names; it is
            consulted first.

    Raises:
        DataError: If the name is neither a vocabulary name, an alias, nor mapped.
    """
    if mapping:
        lowered = {str(k).strip().lower(): v for k, v in mapping.items()}
        key = str(name).strip().lower()
        if key in lowered:
            name = lowered[key]
    key = str(name).strip().lower()
    if key in VOCABULARY:
        return key
    if key in ALIASES:
        return ALIASES[key]
    raise DataError(
        f"unknown channel name {name!r}; known channels are {list(VOCABULARY)} "
        f"(aliases: {sorted(ALIASES)}). Map your own names with data.channel_map, "
        "e.g. data.channel_map={DAPI: nucleus}."
    )


def channel_id(name: str, mapping: Mapping[str, str] | None = None) -> int:
    """Return the stable integer id of a channel name (see :func:`canonical_name`)."""
    return VOCABULARY.index(canonical_name(name, mapping))


def channel_ids(names: Sequence[str], mapping: Mapping[str, str] | None = None) -> list[int]:
    """Return the ids of several channel names; duplicates are an error.

    Raises:
        DataError: On an unknown name or the same channel given twice.
    """
    ids = [channel_id(n, mapping) for n in names]
    if len(set(ids)) != len(ids):
        raise DataError(f"channel names {list(names)} name the same channel twice")
    return ids


def channel_names(ids: Sequence[int]) -> list[str]:
    """Return the canonical names of channel ids."""
    return [VOCABULARY[int(i)] for i in ids]
