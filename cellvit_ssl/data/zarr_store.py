"""A read-only Zarr store wrapper that counts chunk reads and refuses missing chunks.

Zarr fills a chunk that is absent from the store with the array's fill value, silently. For
microscopy that turns a lost or half-copied chunk into a black square fed to the model, so
:class:`CheckedStore` raises :class:`~cellvit_ssl.errors.DataError` naming the store and the
chunk instead (unless told that absent chunks are intentional). It also counts the chunk
keys it was asked for, which is how the tests prove that a region read is lazy.
"""

from __future__ import annotations

from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import LocalStore, WrapperStore

from cellvit_ssl.errors import DataError

#: Keys that hold metadata, not pixels (Zarr v2 and v3).
METADATA_KEYS = frozenset({"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"})


def is_chunk_key(key: str) -> bool:
    """True when a store key names a chunk (or shard) rather than metadata."""
    return key.rsplit("/", 1)[-1] not in METADATA_KEYS


class CheckedStore(WrapperStore):
    """Wrap a store: count chunk reads and raise on a missing chunk.

    Args:
        store: The wrapped store (usually a read-only :class:`zarr.storage.LocalStore`).
        source: Name used in error messages (the path of the store on disk).
        missing_chunks: ``"error"`` (default) raises on an absent chunk; ``"fill"`` lets Zarr
            fill it with the fill value, for stores written with ``write_empty_chunks=False``.

    Attributes:
        chunk_reads: Number of chunk keys requested so far (per process).
        chunk_keys: The chunk keys requested, in order.
    """

    def __init__(self, store, source: str = "", missing_chunks: str = "error") -> None:
        super().__init__(store)
        if missing_chunks not in ("error", "fill"):
            raise DataError(f"missing_chunks={missing_chunks!r}; expected 'error' or 'fill'")
        self.source = source
        self.missing_chunks = missing_chunks
        self.chunk_reads = 0
        self.chunk_keys: list[str] = []

    @classmethod
    def local(cls, path: str, missing_chunks: str = "error") -> CheckedStore:
        """A checked read-only store over a local folder."""
        return cls(LocalStore(path, read_only=True), source=path, missing_chunks=missing_chunks)

    def _with_store(self, store) -> CheckedStore:
        return type(self)(store, source=self.source, missing_chunks=self.missing_chunks)

    def reset_counts(self) -> None:
        """Forget the chunk reads counted so far."""
        self.chunk_reads = 0
        self.chunk_keys = []

    def _check(self, key: str, buf: Buffer | None) -> Buffer | None:
        if is_chunk_key(key):
            self.chunk_reads += 1
            self.chunk_keys.append(key)
            if buf is None and self.missing_chunks == "error":
                raise DataError(
                    f"{self.source}: chunk {key!r} is missing from the Zarr store; expected every chunk "
                    "to be present (a partial copy?). If the store omits empty chunks on purpose, "
                    "set data.missing_chunks=fill"
                )
        return buf

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        return self._check(key, await self._store.get(key, prototype, byte_range))

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        values = await self._store.get_partial_values(prototype, key_ranges)
        return [self._check(key, buf) for (key, _), buf in zip(key_ranges, values)]
