"""UI tests train and generate on tiny models: one torch thread, so a busy 2-core machine does not thrash."""

from __future__ import annotations

import torch


torch.set_num_threads(1)
