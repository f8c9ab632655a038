"""The samples' cross-entropy under a known true density minus its entropy: a precision-side number for toy
densities with a closed-form ``log p``.

    CE gap = E_{x ~ q}[-log p(x)] - H(p)          (nats; q: the model's samples, p: the true density)

0 when ``q = p``. Mass put where ``p`` is small (smeared between the modes) makes it positive and large; mass
concentrated on the modes' centres makes it negative (down to ``max log p - H``), so it is read beside recall
and mode coverage, never alone. It is *not* the reverse KL ``KL(q || p) = CE(q, p) - H(q)``, which needs the
model's own entropy. The NLL gap (``E_{x ~ p}[-log q(x)] - H(p) = KL(p || q)``) is its recall-side partner.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor


def cross_entropy_gap(samples: Tensor, true_log_density: Callable[[Tensor], Tensor], entropy: float) -> float:
    """``-mean log p(samples) - entropy`` for ``samples: (N, D)``; ``inf`` when a sample lies where ``p = 0``."""
    return float(-true_log_density(samples).double().mean()) - entropy
