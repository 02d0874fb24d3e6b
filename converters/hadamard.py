"""Orthonormal Hadamard matrices for QoQ's rotations (spec §1.1b).

Order 2^m is Sylvester's matrix (scipy's ordering). Other orders n = k·2^m use a small Hadamard matrix
H_k and R = kron(H_kᵀ, H_{2^m})/√n, trying k in the reference's order, then 84 (beyond the reference: Gemma 3
27B's hidden 5376 = 84·64). H_k comes from Paley's constructions over prime fields; orders that need prime-power
fields or Williamson matrices (52, 156, 172) are not built, so sizes that only they would cover are refused.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.linalg

from qoq_jax.errors import UnsupportedModelError

# The reference's search order for the non-power-of-two factor k, then ours.
_REFERENCE_ORDERS = (172, 156, 140, 108, 60, 52, 36, 28, 40, 20, 12)
_EXTRA_ORDERS = (84,)


def _legendre_symbols(q: int) -> np.ndarray:
    """χ(x) for x in 0..q-1 over the prime field GF(q): 0, +1 for squares, −1 otherwise."""
    chi = -np.ones(q, dtype=np.int64)
    chi[(np.arange(1, q) ** 2) % q] = 1
    chi[0] = 0
    return chi


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = χ(j − i): antisymmetric for q ≡ 3 (mod 4), symmetric for q ≡ 1 (mod 4)."""
    index = np.arange(q)
    return _legendre_symbols(q)[(index[None, :] - index[:, None]) % q]


def _paley_core(q: int, sign: int) -> np.ndarray:
    """[[0, 1ᵀ], [sign·1, Q]]: the (q+1)×(q+1) conference-style matrix both Paley constructions start from."""
    core = np.zeros((q + 1, q + 1), dtype=np.int64)
    core[0, 1:] = 1
    core[1:, 0] = sign
    core[1:, 1:] = _jacobsthal(q)
    return core


def _paley_1(q: int) -> np.ndarray:
    """Order q+1 for a prime q ≡ 3 (mod 4): I + S with S skew-symmetric."""
    return np.eye(q + 1, dtype=np.int64) + _paley_core(q, -1)


def _paley_2(q: int) -> np.ndarray:
    """Order 2(q+1) for a prime q ≡ 1 (mod 4): each entry of the symmetric core becomes a 2×2 block."""
    core = _paley_core(q, 1)
    zero_block = np.array([[1, -1], [-1, -1]])
    sign_block = np.array([[1, 1], [1, -1]])
    return np.kron(core == 0, zero_block) + np.kron(core, sign_block)


_BUILDERS = {
    12: lambda: _paley_1(11),
    20: lambda: _paley_1(19),
    28: lambda: _paley_2(13),
    36: lambda: _paley_2(17),
    40: lambda: np.kron(scipy.linalg.hadamard(2), _paley_1(19)),
    60: lambda: _paley_2(29),
    108: lambda: _paley_2(53),
    140: lambda: _paley_1(139),
    84: lambda: _paley_1(83),
}
SUPPORTED_ORDERS = tuple(k for k in _REFERENCE_ORDERS + _EXTRA_ORDERS if k in _BUILDERS)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@functools.cache
def hadamard_matrix(n: int) -> np.ndarray:
    """Orthonormal n×n Hadamard matrix (entries ±1/√n), float64 and read-only (it is cached and shared)."""
    if _is_power_of_two(n):
        matrix = scipy.linalg.hadamard(n).astype(np.float64) / np.sqrt(n)
    else:
        k = next((k for k in SUPPORTED_ORDERS if n % k == 0 and _is_power_of_two(n // k)), None)
        if k is None:
            raise UnsupportedModelError(
                f"no Hadamard matrix of order {n} can be built: the order must be 2^m or k·2^m "
                f"with k in {', '.join(map(str, SUPPORTED_ORDERS))}"
            )
        matrix = np.kron(_BUILDERS[k]().T, scipy.linalg.hadamard(n // k)).astype(np.float64) / np.sqrt(n)
    matrix.flags.writeable = False
    return matrix
