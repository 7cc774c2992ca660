"""Data-parallel CGGR: selection and loss normalisation across ranks, DDP/FSDP2 modules, checkpointable state.

* :func:`global_select`: the hardest share of *all* ranks' tokens together,
  exact, within a fixed per-rank capacity (static shapes).
* :func:`global_mean`: a rank's share of the global mean loss, scaled so that
  the gradient averaging of DDP and FSDP2 yields the global mean's gradient.
* :func:`loss_module`: a pure loss (e.g. :func:`cggr_fn.models.cggr_loss`)
  as a module to wrap in ``DistributedDataParallel`` or ``fully_shard``.
* :func:`state_dict` / :func:`load_state_dict`: explicit training state (the
  curriculum step, an :class:`cggr_fn.EmaState`) for
  ``torch.distributed.checkpoint``.

:func:`cggr_fn.models.cggr_loss` takes ``scope="rank"`` (each rank selects
from its own tokens) or ``scope="global"`` (:func:`global_select`) and then
normalises its loss with :func:`global_mean`. Without an initialised process
group, or with one process, every function reduces to its one-process
counterpart and runs no collective.
"""

from cggr_fn._distributed import LossModule, global_mean, global_select, load_state_dict, loss_module, state_dict

__all__ = [
    "LossModule",
    "global_mean",
    "global_select",
    "load_state_dict",
    "loss_module",
    "state_dict",
]
