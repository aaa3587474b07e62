"""A deliberately simple baseline: logistic regression on intensity statistics of the ground-truth head box.

It shows whether the phantoms' stage signs are trivially separable by first-order
intensity statistics. If this baseline already reached the 3D model's AUC, the
benchmark would be too easy. Simulation harness only: it reads every site's data
in one process, which a real federation never does.
"""

from __future__ import annotations

import logging

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from client.site_data import SiteData
from shared_models.metrics import stage_metrics

log = logging.getLogger(__name__)

PERCENTILES = (5, 25, 50, 75, 95)


def box_features(crop: np.ndarray) -> np.ndarray:
    """First-order statistics of a windowed crop (any shape): mean, sd, percentiles, fractions above 0.5/0.7.

    Returns:
        (9,) float64.
    """
    v = crop.ravel()
    return np.array([v.mean(), v.std(), *np.percentile(v, PERCENTILES), (v > 0.5).mean(), (v > 0.7).mean()])


def _site_features(site: SiteData, split: str) -> tuple[np.ndarray, np.ndarray]:
    heads = [h for h in site.heads_in(split) if h.stage is not None and h.box_lps_mm is not None]
    if not heads:
        return np.zeros((0, 9)), np.zeros(0, np.int64)
    x = np.stack([box_features(site.crop(h, h.box_lps_mm)) for h in heads])
    return x, np.array([h.stage for h in heads], np.int64)


def intensity_baseline(
    sites: dict[str, SiteData], train_sites: tuple[str, ...], groups: dict[str, tuple[str, ...]], seed: int = 0
) -> dict:
    """Fit on the training sites' ``train`` heads; report stage metrics per report group on ``test`` heads.

    Returns:
        ``{group: stage_metrics dict}`` (see :func:`shared_models.metrics.stage_metrics`).

    Raises:
        ValueError: if there are no training heads.
    """
    parts = [_site_features(sites[s], "train") for s in train_sites]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    if len(y_train) == 0:
        raise ValueError("intensity baseline: no training heads")
    model = make_pipeline(
        StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed)
    )
    model.fit(x_train, y_train)
    out = {}
    for name, members in groups.items():
        feats = [_site_features(sites[s], "test") for s in members]
        x = np.concatenate([f[0] for f in feats])
        y = np.concatenate([f[1] for f in feats])
        if len(y) == 0:
            continue
        probs = np.zeros((len(y), 3))
        probs[:, model.classes_] = model.predict_proba(x)
        out[name] = stage_metrics(y, probs)
    return out
