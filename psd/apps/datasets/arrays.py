"""In-memory arrays as app input: numpy / scipy.sparse matrices and their ``.npz`` files.

:func:`from_arrays` turns a user's ``X`` (a scipy.sparse matrix or a dense 2-d numpy
array, one row per example) and ``y`` (binary labels, 0/1 or -1/+1) into a
:class:`SparseDataset` whose keys are the column indices, checking everything and
raising :class:`psd.BadRequestError` naming the problem.

:func:`write_npz` stores a data set as a compressed ``.npz`` of CSR arrays, the file a
job names in ``data.npz`` (``psd.estimators.fit_logreg`` writes one and runs the job)::

    indptr   integer, rows + 1, from 0, non-decreasing, ends at nnz
    indices  integer, nnz, >= 0: column index = the feature's key
    values   numbers, nnz
    labels   numbers, rows: 0/1 or -1/+1 (read as y > 0)

:func:`check_npz` looks at the array headers only (names, dtypes, shapes: cheap, nothing
is decompressed), so a job can be checked before a cluster starts; :func:`load_npz`
checks the contents and raises :class:`psd.ConfigError` naming the file.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from psd.apps.datasets.synthetic import SparseDataset
from psd.errors import BadRequestError, ConfigError

#: array name -> (dtype kinds allowed, what is expected)
NPZ_ARRAYS = {
    "indptr": ("iu", "integer row offsets (rows + 1 of them)"),
    "indices": ("iu", "integer column indices (one per stored entry)"),
    "values": ("fiub", "numbers (one per stored entry)"),
    "labels": ("fiub", "numbers, 0/1 or -1/+1 (one per row)"),
}


# -- Python objects -> a data set -----------------------------------------------------------
def _labels(y, rows: int | None, what: str = "y") -> np.ndarray:
    try:
        y = np.asarray(y)
    except Exception as e:  # ragged lists and the like
        raise BadRequestError(f"{what}: expected a vector of binary labels, got {type(y).__name__}: {e}") from None
    if y.ndim == 2 and 1 in y.shape:
        y = y.ravel()
    if y.ndim != 1:
        raise BadRequestError(f"{what}: expected a vector of labels, got an array of shape {y.shape}")
    if y.dtype.kind not in "fiub":
        raise BadRequestError(f"{what}: expected numeric labels (0/1 or -1/+1), got dtype {y.dtype}")
    if rows is not None and y.size != rows:
        raise BadRequestError(f"X has {rows} rows but {what} has {y.size} labels; expected one label per row")
    distinct = np.unique(y)
    if y.dtype.kind == "f" and not np.isfinite(distinct).all():
        raise BadRequestError(f"{what}: labels must be finite; got {distinct[~np.isfinite(distinct)][:3].tolist()}")
    values = set(distinct.astype(np.float64).tolist())
    if not (values <= {0.0, 1.0} or values <= {-1.0, 1.0}):
        shown = ", ".join(f"{v:g}" for v in sorted(values)[:6]) + (", ..." if len(values) > 6 else "")
        raise BadRequestError(f"{what}: labels must be binary, 0/1 or -1/+1; got {len(values)} distinct "
                              f"values: {shown}")
    return (y > 0).astype(np.float32)


def from_arrays(X, y, what: str = "X") -> SparseDataset:
    """``X`` (scipy.sparse matrix or array, or a dense 2-d numpy array) and labels ``y``
    as a data set keyed by column index. Duplicate entries of a sparse row are summed,
    explicit zeros are dropped; raises ``BadRequestError`` naming what is wrong."""
    import scipy.sparse as sp

    ylabel = "y" if what == "X" else f"y of {what}"
    if sp.issparse(X):
        if X.ndim != 2:
            raise BadRequestError(f"{what}: expected a 2-d matrix, got shape {X.shape}")
        for name in ("indices", "indptr", "row", "col"):
            arr = getattr(X, name, None)
            if isinstance(arr, np.ndarray) and arr.dtype.kind not in "iu":
                raise BadRequestError(f"{what}.{name}: expected integer indices, got dtype {arr.dtype}")
        if X.dtype.kind not in "fiub":
            raise BadRequestError(f"{what}: expected numeric values, got dtype {X.dtype}")
        try:
            csr = sp.csr_matrix(X, dtype=np.float64, copy=True)
            csr.sum_duplicates()  # sorts each row's indices too
        except (ValueError, TypeError, IndexError) as e:
            raise BadRequestError(f"{what}: not a valid sparse matrix: {e}") from None
    else:
        try:
            dense = np.asarray(X)
        except Exception as e:
            raise BadRequestError(f"{what}: expected a scipy.sparse matrix or a 2-d numpy array, "
                                  f"got {type(X).__name__}: {e}") from None
        if dense.ndim != 2:
            raise BadRequestError(f"{what}: expected a 2-d array (rows = examples), got shape {dense.shape}")
        if dense.dtype.kind not in "fiub":
            raise BadRequestError(f"{what}: expected numeric values, got dtype {dense.dtype}")
        csr = sp.csr_matrix(dense.astype(np.float64, copy=False))
    rows = csr.shape[0]
    if rows < 1:
        raise BadRequestError(f"{what}: has no rows; expected at least one example")
    if not np.isfinite(csr.data).all():
        raise BadRequestError(f"{what}: has {int(np.sum(~np.isfinite(csr.data)))} NaN or infinite value(s)")
    csr.eliminate_zeros()
    labels = _labels(y, rows, ylabel)
    return SparseDataset(csr.indptr.astype(np.int64), csr.indices.astype(np.uint64),
                         csr.data.astype(np.float32), labels)


# -- .npz files -----------------------------------------------------------------------
def write_npz(path: Path | str, data: SparseDataset) -> Path:
    """Write ``data`` as a compressed ``.npz`` of CSR arrays (atomically: a temporary
    name, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, indptr=data.indptr, indices=data.indices, values=data.values, labels=data.labels)
    os.replace(tmp, path)
    return path


def _header(z: zipfile.ZipFile, name: str) -> tuple[tuple, np.dtype]:
    with z.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return shape, dtype


def check_npz(path: str, key: str, source: str) -> list[str]:
    """Problems with the ``.npz`` file a job names in ``key``, from the array headers:
    readable, the four arrays present, integer indices, consistent lengths."""
    shown = os.path.expanduser(path)
    where = f"{source}: {key}: {shown!r}"
    try:
        z = zipfile.ZipFile(shown)
    except IsADirectoryError:
        return [f"{where} is a directory; expected an .npz file"]
    except OSError as e:
        return [f"{source}: {key}: cannot read {shown!r}: {e.strerror or e}"]
    except zipfile.BadZipFile:
        return [f"{where} is not an .npz file (a zip of .npy arrays, as numpy.savez writes)"]
    problems: list[str] = []
    shapes: dict[str, tuple] = {}
    with z:
        names = set(z.namelist())
        missing = [n for n in NPZ_ARRAYS if f"{n}.npy" not in names]
        if missing:
            have = ", ".join(sorted(n[:-4] for n in names if n.endswith(".npy"))) or "none"
            return [f"{where}: missing array(s) {', '.join(missing)}; expected {', '.join(NPZ_ARRAYS)} "
                    f"(CSR arrays and labels; it has: {have})"]
        for name, (kinds, expected) in NPZ_ARRAYS.items():
            try:
                shape, dtype = _header(z, name)
            except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
                problems.append(f"{where}: array {name} is unreadable: {e}")
                continue
            if dtype.kind not in kinds or dtype.hasobject:
                problems.append(f"{where}: array {name} has dtype {dtype}; expected {expected}")
            elif len(shape) != 1:
                problems.append(f"{where}: array {name} has shape {shape}; expected a vector of {expected}")
            else:
                shapes[name] = shape
    if problems or len(shapes) < len(NPZ_ARRAYS):
        return problems
    n, nnz = shapes["labels"][0], shapes["indices"][0]
    if shapes["indptr"][0] != n + 1:
        problems.append(f"{where}: array indptr has {shapes['indptr'][0]} entries; expected rows + 1 = {n + 1} "
                        f"(labels has {n})")
    if shapes["values"][0] != nnz:
        problems.append(f"{where}: arrays indices and values differ in length ({nnz} and {shapes['values'][0]})")
    if n < 1:
        problems.append(f"{where}: has no rows; expected at least one example")
    return problems


def load_npz(path: str | Path) -> SparseDataset:
    """The data set in an ``.npz`` written by :func:`write_npz` (or by hand with the same
    arrays); its contents are checked, problems raise ``ConfigError`` naming the file."""
    shown = os.path.expanduser(str(path))
    problems = check_npz(shown, "data.npz", "job spec")
    if problems:
        raise ConfigError("; ".join(problems))
    with np.load(shown, allow_pickle=False) as z:
        indptr, indices, values, labels = (z[n] for n in NPZ_ARRAYS)

    def bad(what: str) -> ConfigError:
        return ConfigError(f"{shown}: {what}")

    if indptr[0] != 0 or indptr[-1] != indices.size or np.any(np.diff(indptr) < 0):
        raise bad(f"indptr must start at 0, never decrease and end at the number of entries ({indices.size})")
    if indices.dtype.kind == "i" and indices.size and indices.min() < 0:
        raise bad("indices must be >= 0")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise bad("values has NaN or infinite entries")
    try:
        y = _labels(labels, None, "labels")
    except BadRequestError as e:
        raise bad(e.message) from None
    # rows sorted by column, repeats summed (as the LIBSVM reader leaves them)
    from psd.apps.datasets.libsvm import _csr
    return _csr(indices.astype(np.uint64), values.astype(np.float64), np.diff(indptr).astype(np.int64), y)
