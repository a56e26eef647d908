"""The regularised server-side updaters (prox_l1, adagrad, ftrl) against plain numpy.

Each reference below is written independently of psd, one scalar at a time, straight
from the formula in the updater's docstring (and the cited paper), then compared with
what a Table holding the updater stores after the same pushes. Pushes hit both
contiguous runs of keys (slice selectors) and scattered keys (index selectors).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import psd
from psd.store import Table, TableSpec, make_updater

KEYS = np.array([3, 4, 5, 9, 40, 41], dtype=np.uint64)


def _table(updater: str, dtype="float64", width=1, **options) -> Table:
    return Table(TableSpec("t", width, dtype, updater, options).validate())


def _pushes(seed: int, rounds: int = 12, width: int = 1):
    """(keys, grads) pushes: random subsets of KEYS (sometimes a contiguous run)."""
    rng = np.random.default_rng(seed)
    out = []
    for r in range(rounds):
        if r % 3 == 0:
            keys = KEYS[:3]  # 3, 4, 5: stored contiguously, so a slice selector
        else:
            keys = np.sort(rng.choice(KEYS, size=int(rng.integers(1, KEYS.size + 1)), replace=False))
        out.append((keys, rng.normal(scale=2.0, size=(keys.size, width))))
    return out


def _replay(table: Table, pushes, dtype) -> dict[int, np.ndarray]:
    for keys, grads in pushes:
        table.push(keys, grads.astype(dtype))
    return {int(k): table.pull(np.array([k], np.uint64))[0] for k in KEYS}


def _sign(x: float) -> float:
    x = float(x)
    return float((x > 0) - (x < 0))


def _soft(x: float, t: float) -> float:
    return _sign(x) * max(abs(x) - t, 0.0)


# -- prox_l1 --------------------------------------------------------------------------
@pytest.mark.parametrize("opts", [dict(lr=0.3, l1=0.5), dict(lr=0.1, l1=0.2, l2=1.5), dict(lr=1.0)])
def test_prox_l1_matches_reference(opts):
    pushes = _pushes(1, width=2)
    got = _replay(_table("prox_l1", width=2, **opts), pushes, np.float64)
    lr, l1, l2 = opts["lr"], opts.get("l1", 0.0), opts.get("l2", 0.0)
    ref = {int(k): [0.0, 0.0] for k in KEYS}
    for keys, grads in pushes:
        for k, g in zip(keys, grads):
            for j in range(2):
                w = ref[int(k)][j]
                ref[int(k)][j] = _soft(w - lr * g[j], lr * l1) / (1 + lr * l2)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-12, atol=1e-15)


def test_prox_l1_zeroes_small_weights_and_keeps_float32():
    t = _table("prox_l1", dtype="float32", lr=1.0, l1=0.5)
    keys = np.array([1, 2, 3], np.uint64)
    t.push(keys, np.array([[-0.4], [0.3], [-2.0]], np.float32))
    out = t.pull(keys)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out.ravel(), [0.0, 0.0, 1.5])  # |u| <= l1 * lr -> exactly 0


def test_prox_l1_aggregate_matches_reference():
    """Pushes of (g, h, parts): a key steps once all its parts have arrived, with the
    summed gradient and curvature; keys with one part step at once."""
    lr, l1, l2, eps = 0.5, 0.05, 0.2, 1e-6
    t = _table("prox_l1", width=3, lr=lr, l1=l1, l2=l2, aggregate=True, eps=eps)
    rng = np.random.default_rng(5)
    parts = {int(k): int(p) for k, p in zip(KEYS, [1, 2, 3, 2, 1, 3])}
    w = {k: 0.0 for k in parts}
    pending = {k: [0.0, 0.0, 0] for k in parts}
    last = {k: (0.0, 0.0) for k in parts}
    for _ in range(15):
        keys = np.sort(rng.choice(KEYS, size=int(rng.integers(1, KEYS.size + 1)), replace=False))
        g = rng.normal(size=keys.size)
        h = rng.uniform(0.0, 2.0, size=keys.size)
        rows = np.stack([g, h, [parts[int(k)] for k in keys]], axis=1)
        t.push(keys, rows)
        for k, gi, hi in zip(keys.tolist(), g, h):
            acc = pending[k]
            acc[0] += gi
            acc[1] += hi
            acc[2] += 1
            if acc[2] == parts[k]:
                a = (acc[1] + eps) / lr
                w[k] = _soft(a * w[k] - acc[0], l1) / (a + l2)
                last[k] = (acc[0], acc[1])
                pending[k] = [0.0, 0.0, 0]
    got = t.pull(KEYS)
    for i, k in enumerate(KEYS.tolist()):
        np.testing.assert_allclose(got[i], [w[k], *last[k]], rtol=1e-12, atol=1e-15)
    # the accumulator holds exactly the parts not yet stepped
    acc = t.state["acc"]
    for i, k in enumerate(t.keys.tolist()):
        np.testing.assert_allclose(acc[i], pending[k], rtol=1e-12, atol=1e-15)


def test_prox_l1_aggregate_with_unit_curvature_is_the_plain_step():
    plain = _table("prox_l1", lr=0.2, l1=0.3, l2=0.1)
    agg = _table("prox_l1", width=3, lr=0.2, l1=0.3, l2=0.1, aggregate=True, eps=1e-12)
    keys = np.array([7, 8, 9], np.uint64)
    for g in ([1.0, -2.0, 0.1], [0.5, 0.5, -3.0]):
        g = np.array(g)
        plain.push(keys, g.reshape(-1, 1))
        # two workers each push half the gradient and half the curvature
        for _ in range(2):
            agg.push(keys, np.stack([g / 2, np.full(3, 0.5), np.full(3, 2.0)], axis=1))
    np.testing.assert_allclose(agg.pull(keys)[:, 0], plain.pull(keys)[:, 0], rtol=1e-9)


# -- adagrad --------------------------------------------------------------------------
@pytest.mark.parametrize("opts", [dict(lr=0.5), dict(lr=0.2, eps=1e-3, l1=0.05)])
def test_adagrad_matches_reference(opts):
    pushes = _pushes(2)
    got = _replay(_table("adagrad", **opts), pushes, np.float64)
    lr, eps, l1 = opts["lr"], opts.get("eps", 1e-8), opts.get("l1", 0.0)
    w = {int(k): 0.0 for k in KEYS}
    g2 = {int(k): 0.0 for k in KEYS}
    for keys, grads in pushes:
        for k, g in zip(keys.tolist(), grads[:, 0]):
            g2[k] += g * g
            step = lr / (math.sqrt(g2[k]) + eps)
            w[k] = _soft(w[k] - step * g, step * l1)
    for k in w:
        np.testing.assert_allclose(got[k], [w[k]], rtol=1e-12, atol=1e-15)


# -- ftrl -----------------------------------------------------------------------------
@pytest.mark.parametrize("opts", [dict(alpha=0.5, beta=1.0, l1=0.3, l2=0.2), dict(alpha=0.1), dict(beta=0, l1=1)])
def test_ftrl_matches_reference(opts):
    pushes = _pushes(3)
    table = _table("ftrl", **opts)
    got = _replay(table, pushes, np.float64)
    alpha, beta = opts.get("alpha", 0.1), opts.get("beta", 1.0)
    l1, l2 = opts.get("l1", 0.0), opts.get("l2", 0.0)
    z = {int(k): 0.0 for k in KEYS}
    n = {int(k): 0.0 for k in KEYS}
    w = {int(k): 0.0 for k in KEYS}
    for keys, grads in pushes:
        for k, g in zip(keys.tolist(), grads[:, 0]):
            sigma = (math.sqrt(n[k] + g * g) - math.sqrt(n[k])) / alpha
            z[k] += g - sigma * w[k]
            n[k] += g * g
            w[k] = 0.0 if abs(z[k]) <= l1 else -(z[k] - _sign(z[k]) * l1) / ((beta + math.sqrt(n[k])) / alpha + l2)
    for k in w:
        np.testing.assert_allclose(got[k], [w[k]], rtol=1e-12, atol=1e-15)
    # the state is the z and n of the reference
    for i, k in enumerate(table.keys.tolist()):
        assert table.state["z"][i, 0] == pytest.approx(z[k], rel=1e-12, abs=1e-15)
        assert table.state["n"][i, 0] == pytest.approx(n[k], rel=1e-12)


def test_ftrl_l1_gives_exact_zeros():
    t = _table("ftrl", alpha=0.1, l1=1.0)
    keys = np.array([1, 2], np.uint64)
    t.push(keys, np.array([[0.5], [3.0]]))
    w = t.pull(keys).ravel()
    assert w[0] == 0.0 and w[1] < 0.0


# -- state moves with the keys -------------------------------------------------------------
def test_state_survives_snapshot_and_install():
    """A range copied to another server carries z and n, so FTRL continues identically."""
    a, b = _table("ftrl", alpha=0.3, l1=0.1), _table("ftrl", alpha=0.3, l1=0.1)
    pushes = _pushes(4)
    for keys, grads in pushes[:6]:
        a.push(keys, grads)
    b.install(*a.snapshot(0, 2**64))
    for keys, grads in pushes[6:]:
        a.push(keys, grads)
        b.push(keys, grads)
    np.testing.assert_array_equal(a.pull(KEYS), b.pull(KEYS))


# -- bad options ------------------------------------------------------------------------------
@pytest.mark.parametrize("updater, width, options, needle", [
    ("prox_l1", 1, {"lr": 0}, "'lr' must be a positive number"),
    ("prox_l1", 1, {"lr": "fast"}, "'lr' must be a positive number"),
    ("prox_l1", 1, {"l1": -0.1}, "'l1' must be a number >= 0"),
    ("prox_l1", 1, {"l2": float("nan")}, "'l2' must be a number >= 0"),
    ("prox_l1", 1, {"l_1": 0.1}, "unknown table option 'l_1'"),
    ("prox_l1", 3, {"aggregate": "yes"}, "'aggregate' must be true or false"),
    ("prox_l1", 1, {"aggregate": True}, "width 3"),
    ("prox_l1", 3, {"aggregate": True, "eps": 0}, "'eps' must be a positive number"),
    ("adagrad", 1, {"lr": -1}, "'lr' must be a positive number"),
    ("adagrad", 1, {"eps": 0}, "'eps' must be a positive number"),
    ("adagrad", 1, {"l1": True}, "'l1' must be a number >= 0"),
    ("adagrad", 1, {"beta": 1}, "unknown table option 'beta'"),
    ("ftrl", 1, {"alpha": 0}, "'alpha' must be a positive number"),
    ("ftrl", 1, {"beta": -1}, "'beta' must be a number >= 0"),
    ("ftrl", 1, {"l1": "lots"}, "'l1' must be a number >= 0"),
    ("ftrl", 1, {"l2": -2}, "'l2' must be a number >= 0"),
    ("ftrl", 1, {"lr": 0.1}, "unknown table option 'lr'"),
])
def test_bad_options_name_the_option(updater, width, options, needle):
    with pytest.raises(psd.BadRequestError, match=needle) as info:
        TableSpec("w", width, "float32", updater, options).validate()
    assert updater in str(info.value)


@pytest.mark.parametrize("updater", ["prox_l1", "adagrad", "ftrl"])
def test_float_tables_only(updater):
    with pytest.raises(psd.BadRequestError, match="float table"):
        make_updater(updater, np.dtype(np.int64), {})


def test_table_level_options_are_not_updater_options():
    spec = TableSpec("w", 1, "float32", "ftrl", {"consistency": "sequential", "alpha": 0.2}).validate()
    assert Table(spec).updater.alpha == 0.2


@pytest.mark.parametrize("options, needle", [
    ({f"o{i}": i for i in range(17)}, "at most 16 options, got 17"),
    ({"x" * 65: 1}, "option names must be strings of 1 to 64 characters"),
    ({"note": "y" * 65}, "option 'note' must be a number, true/false or a string of at most 64"),
    ({"nested": {"a": [1, 2, 3]}}, "option 'nested' must be a number, true/false or a string"),
    ({"blob": b"\x00" * 10}, "option 'blob' must be a number"),
])
def test_table_options_are_a_few_named_scalars(options, needle):
    """Any updater: a spec is in every status reply and every server's memory, so what a
    client may put in its options is bounded before anything is created."""
    with pytest.raises(psd.BadRequestError, match=needle):
        TableSpec("w", 1, "float32", "sum", options).validate()
    assert TableSpec("w", 1, "float32", "sum", {f"o{i}": "z" * 64 for i in range(16)}).validate()
