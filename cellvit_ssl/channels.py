"""The channel vocabulary: names, aliases and stable integer ids, shared by data, models and embed.

Every channel that reaches a model is identified by an integer id from one vocabulary, so
``nucleus`` means the same thing in HPA, WTC-11 and Cell Painting and channels may arrive in
any order or subset. The built-in names below are only ever appended to, never reordered, so
ids in old checkpoints stay valid. A lab with a stain the built-in list lacks extends it from
the config (``data.extra_channels=[lipid]``, ids follow the built-in ones) and maps its own
spellings with ``data.channel_map={BODIPY: lipid}``; a checkpoint records the vocabulary it was
trained with (:meth:`ChannelVocabulary.to_dict`), so it embeds the same way on another install.

Names found in files or written by users are matched case-insensitively, with spaces,
hyphens and underscores treated alike; common stain / dye names are aliases (``DAPI``,
``Hoechst 33342`` → ``nucleus``); the user mapping is consulted first. Names always travel
with the data (the index's ``channels`` column, OME metadata), never as positions alone:
Broad has noted published Cell Painting data with mislabelled channels.

This module depends on nothing else in the package, so models and data can both use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cellvit_ssl.errors import DataError

#: Id of a padded (absent) channel position in a batch: no channel has it, and models skip it.
PAD_CHANNEL_ID = -1

#: Built-in canonical channel names; the position is the channel id. Append only.
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


@dataclass(frozen=True)
class ChannelVocabulary:
    """Channel names with their ids, aliases and a user's own spellings.

    Args:
        names: Canonical names; a name's position is its id.
        aliases: Other spellings → canonical name (matched case-insensitively).
        mapping: The user's names → canonical names (``data.channel_map``), consulted first.

    Raises:
        DataError: If a name is repeated, an alias points at no name, or a user mapping
            points at an unknown channel.

    Examples:
        >>> vocab = ChannelVocabulary.extended(["lipid"], {"BODIPY": "lipid"})
        >>> vocab.ids(["DAPI", "bodipy"]) == [0, len(VOCABULARY)]
        True
    """

    names: tuple[str, ...] = VOCABULARY
    aliases: Mapping[str, str] = field(default_factory=lambda: dict(ALIASES))
    mapping: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.names)
        object.__setattr__(self, "names", names)
        keys = [_key(n) for n in names]
        dupes = sorted({n for n, k in zip(names, keys) if keys.count(k) > 1})
        if dupes:
            raise DataError(f"channel vocabulary names {dupes} more than once; every channel name must be unique")
        by_key = dict(zip(keys, names))
        aliases = {}
        for alias, target in dict(self.aliases).items():
            if _key(target) not in by_key:
                raise DataError(f"channel alias {alias!r} points at {target!r}, which is not a channel name")
            aliases[_key(alias)] = by_key[_key(target)]
        object.__setattr__(self, "_by_key", {**aliases, **by_key})
        object.__setattr__(self, "_ids", {n: i for i, n in enumerate(names)})
        mapped = {}
        for own, target in dict(self.mapping).items():
            if _key(target) not in self._by_key:
                raise DataError(f"data.channel_map maps {own!r} to {target!r}, which is no known channel; "
                                f"known channels are {list(names)} (add new stains with data.extra_channels)")
            mapped[_key(own)] = self._by_key[_key(target)]
        object.__setattr__(self, "_mapped", mapped)

    @classmethod
    def extended(cls, extra: Sequence[str] = (), mapping: Mapping[str, str] | None = None) -> ChannelVocabulary:
        """The built-in vocabulary with ``extra`` names appended (ids follow) and a user mapping.

        Raises:
            DataError: If an extra name is already a channel name or alias.
        """
        builtin = ChannelVocabulary()
        taken = [n for n in extra if _key(n) in builtin._by_key]
        if taken:
            raise DataError(f"data.extra_channels {taken} are already known channels "
                            f"({[builtin._by_key[_key(n)] for n in taken]}); list only new stains there")
        return cls(VOCABULARY + tuple(str(n) for n in extra), dict(ALIASES), dict(mapping or {}))

    @classmethod
    def from_config(cls, data_cfg) -> ChannelVocabulary:
        """The vocabulary of a run: ``data.extra_channels`` and ``data.channel_map``."""
        return cls.extended(list(getattr(data_cfg, "extra_channels", []) or []), dict(data_cfg.channel_map or {}))

    def to_dict(self) -> dict:
        """Everything needed to resolve names the same way elsewhere (stored in checkpoints)."""
        return {"names": list(self.names), "aliases": dict(self.aliases), "mapping": dict(self.mapping)}

    @classmethod
    def from_dict(cls, data: Mapping) -> ChannelVocabulary:
        """Rebuild a vocabulary written by :meth:`to_dict`."""
        return cls(tuple(data["names"]), dict(data.get("aliases", {})), dict(data.get("mapping", {})))

    def __len__(self) -> int:
        return len(self.names)

    def canonical(self, name: str) -> str:
        """The canonical name of a channel name found in data or config.

        Raises:
            DataError: If the name is neither a channel name, an alias, nor mapped.
        """
        key = _key(name)
        key = _key(self._mapped.get(key, name))
        if key in self._by_key:
            return self._by_key[key]
        extra = [n for n in self.names if n not in VOCABULARY]
        known = f"{list(VOCABULARY)}" + (f" + extra channels {extra}" if extra else "")
        raise DataError(
            f"unknown channel name {name!r}; known channels are {known} (aliases: {sorted(ALIASES)}). "
            "Map your own names with data.channel_map (e.g. data.channel_map={DAPI: nucleus}) or add a "
            "new stain with data.extra_channels=[name]"
        )

    def canonical_names(self, names: Sequence[str], *, source: str | None = None) -> list[str]:
        """Canonical names of several channels; an unknown or repeated channel is an error.

        Args:
            names: Channel names in file order.
            source: The file the names come from, named in error messages.

        Raises:
            DataError: On an unknown name or the same channel named twice, naming ``source``.
        """
        prefix = f"{source}: " if source else ""
        try:
            canon = [self.canonical(n) for n in names]
        except DataError as exc:
            raise DataError(f"{prefix}{exc}") from exc
        dupes = sorted({c for c in canon if canon.count(c) > 1})
        if dupes:
            raise DataError(f"{prefix}channel names {list(names)} name the same channel twice ({dupes})")
        return canon

    def id(self, name: str) -> int:
        """The integer id of a channel name (see :meth:`canonical`)."""
        return self._ids[self.canonical(name)]

    def ids(self, names: Sequence[str]) -> list[int]:
        """The ids of several channel names.

        Raises:
            DataError: On an unknown name or the same channel given twice.
        """
        return [self._ids[n] for n in self.canonical_names(names)]

    def names_of(self, ids: Sequence[int]) -> list[str]:
        """The canonical names of channel ids."""
        return [self.names[int(i)] for i in ids]


#: The built-in vocabulary without user names.
BUILTIN = ChannelVocabulary()


def canonical_name(name: str, mapping: Mapping[str, str] | None = None) -> str:
    """The built-in vocabulary's canonical name for ``name`` (``mapping``: user names first)."""
    return (ChannelVocabulary(mapping=mapping) if mapping else BUILTIN).canonical(name)


def canonical_names(names: Sequence[str], mapping: Mapping[str, str] | None = None, *,
                    source: str | None = None) -> list[str]:
    """:meth:`ChannelVocabulary.canonical_names` on the built-in vocabulary."""
    return (ChannelVocabulary(mapping=mapping) if mapping else BUILTIN).canonical_names(names, source=source)


def channel_id(name: str, mapping: Mapping[str, str] | None = None) -> int:
    """The built-in id of a channel name."""
    return (ChannelVocabulary(mapping=mapping) if mapping else BUILTIN).id(name)


def channel_ids(names: Sequence[str], mapping: Mapping[str, str] | None = None) -> list[int]:
    """The built-in ids of several channel names; duplicates are an error."""
    return (ChannelVocabulary(mapping=mapping) if mapping else BUILTIN).ids(names)
