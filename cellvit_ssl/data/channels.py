"""Named channel vocabulary shared across datasets.

Every channel that reaches a model is identified by a stable integer id from one global
vocabulary, so ``nucleus`` means the same thing in HPA, WTC-11 and Cell Painting and channels
may arrive in any order or subset. New names are only ever appended, never reordered, so ids
in old checkpoints stay valid.

Names found in files or written by users are matched case-insensitively, with spaces,
hyphens and underscores treated alike; common stain / dye names are aliases (``DAPI``,
``Hoechst 33342`` → ``nucleus``); a user mapping (``data.channel_map``) is consulted first.
Names always travel with the data (the index's ``channels`` column, OME metadata), never as
positions alone: Broad has noted published Cell Painting data with mislabelled channels.
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
    "hoechst_33342": "nucleus",
    "draq5": "nucleus",
    "h2b": "nucleus",
    "alpha_tubulin": "microtubules",
    "concanavalin_a": "er",
    "cona": "er",
    "calnexin": "er",
    "syto_14": "rna",
    "actin_golgi_plasma_membrane": "agp",
    "mitotracker_deep_red": "mito",
    "cell_mask": "membrane",
    "plasma_membrane": "membrane",
    "f_actin": "actin",
}

#: Channel names in on-disk order for the datasets the package knows.
PRESETS: dict[str, tuple[str, ...]] = {
    "hpa": ("microtubules", "protein", "nucleus", "er"),
    "wtc11": ("nucleus", "membrane", "protein"),
    "cellpainting": ("nucleus", "rna", "er", "agp", "mito"),
    "demo": ("nucleus", "microtubules", "er", "protein"),
}

#: Other spellings of the preset names (CHAMMI calls WTC-11 "Allen" and Cell Painting "CP").
PRESET_ALIASES: dict[str, str] = {"wtc": "wtc11", "wtc-11": "wtc11", "allen": "wtc11", "cp": "cellpainting",
                                  "cell_painting": "cellpainting", "jump": "cellpainting"}

#: CHAMMI sub-dataset folder → preset of its channel tapes (channels in on-disk order).
CHAMMI_PRESETS: dict[str, str] = {"Allen": "wtc11", "HPA": "hpa", "CP": "cellpainting"}


def _key(name: str) -> str:
    return "_".join(str(name).strip().lower().replace("-", " ").replace("_", " ").split())


_VOCAB_KEYS = {_key(v): v for v in VOCABULARY}
_ALIAS_KEYS = {_key(k): v for k, v in ALIASES.items()}


def preset(name: str) -> list[str]:
    """Channel names, in on-disk order, of a known dataset.

    Args:
        name: ``hpa``, ``wtc11`` (or ``allen``), ``cellpainting`` (or ``cp``), ``demo``.

    Raises:
        DataError: On an unknown preset, listing the known ones.

    Examples:
        >>> preset("cp")
        ['nucleus', 'rna', 'er', 'agp', 'mito']
    """
    key = str(name).strip().lower()
    key = PRESET_ALIASES.get(key, key)
    if key not in PRESETS:
        raise DataError(f"unknown channel preset {name!r}; known presets are {sorted(PRESETS)} "
                        f"(aliases: {sorted(PRESET_ALIASES)})")
    return list(PRESETS[key])


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
        mapped = {_key(k): v for k, v in mapping.items()}
        name = mapped.get(_key(name), name)
    key = _key(name)
    if key in _VOCAB_KEYS:
        return _VOCAB_KEYS[key]
    if key in _ALIAS_KEYS:
        return _ALIAS_KEYS[key]
    raise DataError(
        f"unknown channel name {name!r}; known channels are {list(VOCABULARY)} "
        f"(aliases: {sorted(ALIASES)}). Map your own names with data.channel_map, "
        "e.g. data.channel_map={DAPI: nucleus}."
    )


def canonical_names(
    names: Sequence[str], mapping: Mapping[str, str] | None = None, *, source: str | None = None
) -> list[str]:
    """Canonical names of several channels; an unknown or repeated channel is an error.

    Args:
        names: Channel names in file order.
        mapping: Optional user mapping (see :func:`canonical_name`).
        source: The file the names come from, named in error messages.

    Raises:
        DataError: On an unknown name or the same channel named twice, naming ``source``.
    """
    prefix = f"{source}: " if source else ""
    try:
        canon = [canonical_name(n, mapping) for n in names]
    except DataError as exc:
        raise DataError(f"{prefix}{exc}") from exc
    dupes = sorted({c for c in canon if canon.count(c) > 1})
    if dupes:
        raise DataError(f"{prefix}channel names {list(names)} name the same channel twice ({dupes})")
    return canon


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
