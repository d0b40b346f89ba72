"""Synthetic card transactions: two features per record, the amount and the time of day.

Normal traffic follows a daily cycle (larger payments by day); an outlier is a payment 20-50x the
account's usual amount. Records stay in time order per account. Deterministic for a given seed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

START_EPOCH_S = 1_700_000_000  # 2023-11-14 22:13:20 UTC, fixed so runs are reproducible


def transactions(count: int, outlier_prob: float = 0.01, accounts: int = 20, seed: int = 0,
                 start_epoch_s: float = START_EPOCH_S, step_s: float = 60.0) -> pd.DataFrame:
    """Columns: series (account id), epoch_s, value (amount), is_outlier."""
    if not 0 <= outlier_prob <= 1:
        raise ValueError("outlier_prob must be in [0, 1]")
    rng = np.random.default_rng(seed)
    epoch_s = start_epoch_s + np.arange(count) * step_s
    account = rng.integers(0, accounts, count)
    usual = 20 + 10 * (np.arange(accounts) % 5)  # each account has its own typical amount
    hour = (epoch_s // 3600) % 24
    daytime = 1 + 0.5 * np.sin((hour - 6) / 24 * 2 * np.pi)
    value = usual[account] * daytime * rng.lognormal(0, 0.25, count)
    is_outlier = rng.random(count) < outlier_prob
    value[is_outlier] = usual[account[is_outlier]] * rng.uniform(20, 50, is_outlier.sum())
    return pd.DataFrame({
        "series": [f"account-{a:03d}" for a in account],
        "epoch_s": epoch_s,
        "value": np.round(value, 2),
        "is_outlier": is_outlier,
    })
