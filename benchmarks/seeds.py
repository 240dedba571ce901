"""What the quality benchmarks share: the interval over seeds and the public figures.

Plain Python (no TensorFlow, no Keras), so the GPU machine's JAX-only runs import it too.
"""

from __future__ import annotations

import statistics

# Public figures on MovieLens latest-small under the peers' protocol (LongCTR zoo, PyTorch;
# test AUC, click-only history of up to 100 events).
LONGCTR = {"DIN": 0.693, "SDIM": 0.686, "SIM": 0.678, "ETA": 0.678, "TWIN": 0.677,
           "DNN": 0.670, "item CTR floor": 0.659}  # fmt: skip

# Two-sided 97.5% quantiles of Student's t for n - 1 = 1..9 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262)


def ci95(vals: list) -> float:
    """Half-width of the 95% interval of the mean over seeds (Student's t), 0 for one seed."""
    n = len(vals)
    if n < 2:
        return 0.0
    t = _T975[n - 2] if n - 2 < len(_T975) else 1.96
    return t * statistics.stdev(vals) / n**0.5
