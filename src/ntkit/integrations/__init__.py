"""Use ntkit's methods inside the training code you already have.

* plain PyTorch — the README's "Use it in your own training loop" (partition → ``attach`` →
  ``SlicedAdamW`` → ``build_method`` → the hooks around your step);
* :mod:`ntkit.integrations.hf` — :class:`~ntkit.integrations.hf.NtkitCallback` for the Hugging Face
  ``Trainer`` (extra ``ntkit[hf]``);
* :mod:`ntkit.integrations.lightning` — :class:`~ntkit.integrations.lightning.NtkitLightningCallback`
  for PyTorch Lightning (extra ``ntkit[lightning]``).

Both callbacks share :class:`~ntkit.integrations._driver.MethodDriver` (framework events → method
hooks, samples drawn from the framework's train dataset) and :class:`MethodSlicedAdamW` (the
optimizer to hand the framework). The framework packages are imported only by their submodules.
"""

from __future__ import annotations

from ntkit.integrations._driver import MethodDriver, MethodSlicedAdamW

__all__ = ["MethodDriver", "MethodSlicedAdamW"]
