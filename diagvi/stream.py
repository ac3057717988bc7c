"""Data larger than memory: rows read from an ``.h5ad`` file in contiguous chunks.

Training from disk needs three things, all here: a reader that keeps the matrix on disk and
reads whole chunks of rows (:class:`BackedMatrix`), an epoch order that visits the data chunk
by chunk yet mixes cells (:func:`chunk_shuffle`, used by :class:`diagvi.data.PairedSampler`),
and a writer that puts results on disk block by block (:class:`NpyWriter`), so that neither
the input nor an output ever needs to be held whole.

Reading a contiguous row range of a CSR matrix is three slices of ``indptr``, ``indices`` and
``data``, a sequential read. Random access to single rows, what a per-cell shuffle asks of a
file, is far slower; hence the chunk-level shuffle. A chunk is read once and kept in a small
least-recently-used cache while the minibatches drawn from it are formed; counts stay sparse
until a minibatch is made dense.
"""

from __future__ import annotations

import os
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp

from diagvi.errors import DataError
from diagvi.io import temporary_file

#: Rows per chunk: the unit of reading and of the chunk-level shuffle.
CHUNK_ROWS = 2048
#: Chunks whose cells are shuffled together; a minibatch draws its cells from one such buffer.
BUFFER_CHUNKS = 8


class BackedMatrix:
    """The rows of a CSR or dense matrix stored in an ``.h5ad`` file, read on demand.

    Indexing gives a view (``X[idx]`` is a :class:`BackedMatrix` over those rows, like a view of
    a backed AnnData); :meth:`read` gives the values. The h5py file is opened lazily in each
    process, so the object pickles and every DataLoader worker reads through its own handle.

    Parameters
    ----------
    path
        The ``.h5ad`` file (a relative path is taken from the current directory, now).
    key
        The matrix inside it: ``"X"`` or ``"layers/<name>"``.
    rows
        Rows of the file this matrix shows, in this order (ascending keeps reads contiguous);
        ``None``: all of them.
    chunk_rows
        Rows per chunk read at once; default :data:`CHUNK_ROWS`.
    buffer_chunks
        Chunks a shuffled epoch mixes at a time (:func:`chunk_shuffle`); the cache keeps twice
        as many, so that each chunk is read once per epoch. Default :data:`BUFFER_CHUNKS`.

    Raises
    ------
    DataError
        The element is neither a dense array nor a CSR matrix (e.g. CSC, which has no cheap
        row access).
    """

    def __init__(
        self,
        path: str | Path,
        key: str = "X",
        rows: np.ndarray | None = None,
        chunk_rows: int | None = None,
        buffer_chunks: int | None = None,
    ) -> None:
        self.chunk_rows = int(CHUNK_ROWS if chunk_rows is None else chunk_rows)
        self.buffer_chunks = int(BUFFER_CHUNKS if buffer_chunks is None else buffer_chunks)
        if self.chunk_rows < 1 or self.buffer_chunks < 1:
            raise ValueError(
                f"chunk_rows and buffer_chunks must be >= 1, got {chunk_rows}, {buffer_chunks}"
            )
        # absolute: the file is reopened lazily (a view, a worker, after close()), perhaps
        # after the working directory has changed
        self.path, self.key = os.path.abspath(path), key
        with h5py.File(self.path, "r") as f:
            if key not in f:
                raise DataError(f"{self.path}: no element {key!r} in the file")
            element = f[key]
            if isinstance(element, h5py.Dataset):
                self.is_sparse, shape, self.dtype = False, element.shape, element.dtype
            else:
                encoding = element.attrs.get("encoding-type", "")
                if isinstance(encoding, bytes):  # a fixed-length string (Julia's HDF5.jl, ...),
                    encoding = encoding.decode()  # which anndata reads as the same encoding
                if encoding != "csr_matrix":
                    raise DataError(
                        f"{self.path}: {key} is stored as {encoding or 'an unknown element'}; "
                        "reading from disk needs a CSR matrix or a dense array: write it with "
                        "adata.X = adata.X.tocsr() (or load it into memory)"
                    )
                self.is_sparse, shape = True, tuple(element.attrs["shape"])
                self.dtype = element["data"].dtype
        if len(shape) != 2:
            raise DataError(f"{self.path}: {key} must be 2-dimensional, got shape {shape}")
        self.n_file_rows, n_vars = int(shape[0]), int(shape[1])
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.shape = (self.n_file_rows if self.rows is None else len(self.rows), n_vars)
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._indptr: np.ndarray | None = None
        self._cache: OrderedDict[int, np.ndarray | sp.csr_matrix] = OrderedDict()

    ndim = 2

    @classmethod
    def open(cls, adata, layer: str | None = None) -> BackedMatrix:
        """X (or layer ``layer``) of an AnnData opened with ``backed="r"``, kept on disk."""
        if not adata.isbacked:
            raise ValueError("the AnnData is not opened with backed='r': it has no file to read")
        if adata.is_view:
            # the file holds all cells and features; the view's subset would be lost
            raise ValueError(
                "the AnnData is a view of a backed AnnData; load it with adata.to_memory() "
                "or open the whole file"
            )
        return cls(adata.filename, "X" if layer is None else f"layers/{layer}")

    def __repr__(self) -> str:
        kind = "CSR" if self.is_sparse else "dense"
        return f"BackedMatrix({self.path}:{self.key}, {kind}, shape={self.shape})"

    def __getstate__(self) -> dict:
        # h5py handles do not pickle; a worker opens its own and reads its own chunks
        return {**self.__dict__, "_file": None, "_pid": None, "_indptr": None, "_cache": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cache = OrderedDict()

    def __getitem__(self, idx) -> BackedMatrix:
        """A view over rows ``idx`` (int array, boolean mask or slice) of this matrix."""
        positions = np.arange(self.shape[0])[idx]
        rows = positions if self.rows is None else self.rows[positions]
        return BackedMatrix(self.path, self.key, rows, self.chunk_rows, self.buffer_chunks)

    # ------------------------------------------------------------------ reading

    def _handle(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():  # a forked worker opens its own
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._file

    def close(self) -> None:
        """Close this process's file handle (reads reopen it)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file, self._pid = None, None

    def _read_span(self, lo: int, hi: int) -> np.ndarray | sp.csr_matrix:
        """File rows ``lo .. hi - 1`` as float32 (canonical CSR, or dense)."""
        element = self._handle()[self.key]
        with np.errstate(over="ignore"):  # float64 beyond float32's range: inf, as in memory
            if not self.is_sparse:
                return np.asarray(element[lo:hi], dtype=np.float32)
            if self._indptr is None:
                self._indptr = element["indptr"][:].astype(np.int64)
            start, stop = self._indptr[lo], self._indptr[hi]
            block = sp.csr_matrix(
                (
                    np.asarray(element["data"][start:stop], dtype=np.float32),
                    element["indices"][start:stop],
                    self._indptr[lo : hi + 1] - start,
                ),
                shape=(hi - lo, self.shape[1]),
            )
        block.sum_duplicates()  # as the in-memory copy: each stored value is one entry
        block.eliminate_zeros()
        return block

    def _read_rows(self, file_rows: np.ndarray) -> np.ndarray | sp.csr_matrix:
        """File rows ``file_rows``, in that order.

        Sorted, the rows fall into bins of ``4 * chunk_rows`` file rows; each bin is read as
        the one span that covers its rows. Rows close together (a view of most cells, or of
        every tenth) take a few sequential reads; scattered rows cost more reads but never
        more memory than a bin.
        """
        order = np.argsort(file_rows, kind="stable")
        ordered = file_rows[order]
        bins = np.split(ordered, np.flatnonzero(np.diff(ordered // (4 * self.chunk_rows))) + 1)
        parts = []
        for rows in bins:
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            span = self._read_span(lo, hi)
            contiguous = hi - lo == len(rows) and np.all(np.diff(rows) == 1)
            parts.append(span if contiguous else span[rows - lo])
        block = sp.vstack(parts, format="csr") if self.is_sparse else np.concatenate(parts)
        if np.all(order[1:] > order[:-1]):  # already in file order
            return block
        return block[np.argsort(order)]

    @property
    def n_chunks(self) -> int:
        return -(-self.shape[0] // self.chunk_rows)

    def chunk(self, c: int) -> np.ndarray | sp.csr_matrix:
        """Rows ``c * chunk_rows`` up to ``(c + 1) * chunk_rows`` (cached)."""
        if c in self._cache:
            self._cache.move_to_end(c)
            return self._cache[c]
        stop = min((c + 1) * self.chunk_rows, self.shape[0])
        start = c * self.chunk_rows
        if self.rows is None:
            block = self._read_span(start, stop)
        else:
            block = self._read_rows(self.rows[start:stop])
        self._cache[c] = block
        while len(self._cache) > 2 * self.buffer_chunks:
            self._cache.popitem(last=False)
        return block

    def chunks(self) -> Iterator[tuple[int, np.ndarray | sp.csr_matrix]]:
        """``(first row, block)`` of every chunk, in order."""
        for c in range(self.n_chunks):
            yield c * self.chunk_rows, self.chunk(c)

    def read(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (integers, negative from the end, or a boolean mask) as a dense float32
        array, in the order given; each chunk read once."""
        n, idx = self.shape[0], np.asarray(idx)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"{self!r}: a boolean mask of {len(idx)} values for {n} rows")
            idx = np.flatnonzero(idx)
        elif idx.size and idx.dtype.kind not in "iu":
            raise IndexError(f"{self!r}: rows must be integers or a boolean mask, got {idx.dtype}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            bad = idx[(idx < -n) | (idx >= n)][0]
            raise IndexError(f"{self!r}: row {bad} is out of range for {n} rows")
        idx = np.where(idx < 0, idx + n, idx)
        out = np.empty((len(idx), self.shape[1]), dtype=np.float32)
        which = idx // self.chunk_rows
        # cached chunks first: a chunk read now evicts the least recently used one, which must
        # not be one this minibatch still needs (that would read it twice)
        for c in sorted(np.unique(which), key=lambda c: c not in self._cache):
            sel = np.flatnonzero(which == c)
            block = self.chunk(int(c))[idx[sel] - c * self.chunk_rows]
            out[sel] = block.toarray() if sp.issparse(block) else block
        return out

    def row_sums(self) -> np.ndarray:
        """Sum of every row (library sizes of counts), chunk by chunk."""
        sums = [np.asarray(b.sum(1)).ravel() for _, b in self.chunks()]
        return np.concatenate(sums) if sums else np.zeros(0, dtype=np.float32)  # no rows


def row_sums(X) -> np.ndarray:
    """Row sums of a dense, sparse or :class:`BackedMatrix` matrix."""
    if isinstance(X, BackedMatrix):
        return X.row_sums()
    return np.asarray(X.sum(1)).ravel()


def blocks(X) -> Iterator[tuple[int, np.ndarray | sp.csr_matrix]]:
    """``(first row, block)`` over a matrix: chunk by chunk from disk, one block in memory."""
    if isinstance(X, BackedMatrix):
        yield from X.chunks()
    else:
        yield 0, X


def chunk_shuffle(
    idx: np.ndarray, chunk_rows: int, buffer_chunks: int, rng: np.random.Generator
) -> np.ndarray:
    """The cells ``idx`` in a random order that reads the data chunk by chunk.

    Chunk ``c`` holds rows ``[c * chunk_rows, (c + 1) * chunk_rows)``. The chunks that hold
    cells of ``idx`` are put in a random order; each run of ``buffer_chunks`` consecutive chunks
    of that order is a buffer whose cells are shuffled together. Slicing the result into
    minibatches gives each minibatch cells from at most two buffers, so a cache of
    ``2 * buffer_chunks`` chunks reads every chunk once per epoch. The price is weaker mixing
    than a full permutation: a minibatch samples ``buffer_chunks * chunk_rows`` rows, not all of
    them (shuffle a file sorted by sample or cell type once before training from disk).
    """
    idx = np.asarray(idx)
    which = idx // chunk_rows
    order = np.argsort(which, kind="stable")
    _, starts = np.unique(which[order], return_index=True)
    groups = np.split(idx[order], starts[1:])
    visit = rng.permutation(len(groups))
    buffers = [
        rng.permutation(np.concatenate([groups[g] for g in visit[b : b + buffer_chunks]]))
        for b in range(0, len(visit), buffer_chunks)
    ]
    return np.concatenate(buffers) if buffers else idx[:0]


class NpyWriter:
    """Rows of a result written in order, block by block, into an ``.npy`` file.

    Plain file writes, not a writable memmap: written pages do not stay in the process's
    resident memory. The header (shape, dtype) is written with the first block, whose trailing
    shape and dtype the result takes. :meth:`result` opens the finished file as a read-only
    memmap.

    The rows go to a temporary file next to ``path``, moved onto it by :meth:`result` once all
    ``n_rows`` are written: a run that fails midway leaves no truncated ``.npy`` behind (the
    temporary file is removed when the writer is discarded), and a file already at ``path``,
    perhaps still open as an earlier result's memmap, is replaced, not rewritten in place (its
    memmap would change under the user, or fault once the file is truncated).
    """

    def __init__(self, path: str | Path, n_rows: int) -> None:
        self.path, self.n_rows, self._rows = Path(path), int(n_rows), 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = None
        self._cleanup: weakref.finalize | None = None
        self._done = False

    def write(self, block: np.ndarray) -> None:
        """Append the next rows."""
        block = np.ascontiguousarray(block)
        if self._file is None:
            tmp = temporary_file(self.path)
            self._file = open(tmp, "wb")  # closed by result(), or by the finaliser on failure
            self._cleanup = weakref.finalize(self, _discard, self._file, tmp)
            header = {
                "descr": np.lib.format.dtype_to_descr(block.dtype),
                "fortran_order": False,
                "shape": (self.n_rows, *block.shape[1:]),
            }
            np.lib.format.write_array_header_1_0(self._file, header)
        self._file.write(block.tobytes())
        self._rows += len(block)

    def result(self) -> np.ndarray:
        """Close the file, move it into place and open it read-only (a memmap: pages load when
        used)."""
        if not self._done:
            if self._file is None or self._rows != self.n_rows:
                if self._cleanup is not None:
                    self._cleanup()  # no partial result left behind
                raise RuntimeError(f"{self.path}: wrote {self._rows} rows of {self.n_rows}")
            self._file.close()
            os.replace(self._file.name, self.path)
            self._cleanup.detach()
            self._done = True
        return np.load(self.path, mmap_mode="r")


def _discard(file, path: str) -> None:
    """Close and remove an unfinished :class:`NpyWriter` file."""
    file.close()
    Path(path).unlink(missing_ok=True)


class ArrayWriter:
    """In-memory counterpart of :class:`NpyWriter`: rows filled into one array, allocated with
    the first block (its trailing shape and dtype)."""

    def __init__(self, n_rows: int) -> None:
        self.n_rows, self._rows = int(n_rows), 0
        self.array: np.ndarray | None = None

    def write(self, block: np.ndarray) -> None:
        if self.array is None:
            self.array = np.empty((self.n_rows, *block.shape[1:]), dtype=block.dtype)
        self.array[self._rows : self._rows + len(block)] = block
        self._rows += len(block)

    def result(self) -> np.ndarray:
        if self.array is None:
            raise ValueError("no rows to return: the data have no cells")
        return self.array


def row_writer(out: str | Path | None, n_rows: int) -> NpyWriter | ArrayWriter:
    """An :class:`NpyWriter` to the ``.npy`` file ``out``, or an :class:`ArrayWriter` when
    ``out`` is None, for a result of ``n_rows`` rows."""
    return ArrayWriter(n_rows) if out is None else NpyWriter(out, n_rows)
