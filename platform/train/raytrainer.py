"""`TorchTrainer` with one Ray 2.60 bug worked around: a live run torn down by its cleaner.

Ray Train V2 starts a detached `PlacementGroupCleaner` per run that removes the run's
placement group once the controller actor is dead. Its liveness test,
`ray.train.v2._internal.state.util.is_actor_alive`, asks the State API with no address, so
on a machine running several Ray clusters it asks the newest one ("Found multiple active
Ray instances ... Connecting to latest cluster"), which does not know the controller; and
it treats that missing answer (or one lost on a busy head) as death. The cleaner then
removes the placement group of a healthy run: every worker is killed with "Destroying
worker since its placement group was removed" (seen in this project's tests; the review of
ray-project/ray#65447 names the second cause). Here the cleaner asks its own cluster, and
only a recorded DEAD state counts as dead; it still frees the placement group of a
controller that really died. Remove this module when Ray fixes `is_actor_alive`.
"""
from __future__ import annotations

import logging

from ray.train.torch import TorchTrainer

log = logging.getLogger(__name__)


def alive_unless_recorded_dead(actor_id: str, timeout: int) -> bool:
    """Ask this process's own cluster; no answer (None, or no State API at all) is not
    death: the GCS keeps the record of an actor that died."""
    import ray
    from ray.util.state import get_actor
    from ray.util.state.exception import RayStateApiException

    address = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    try:
        state = get_actor(actor_id, address=address, timeout=timeout)
    except RayStateApiException:  # no dashboard (a local cluster started without one): unknown
        return True
    return state is None or state.state != "DEAD"


try:  # Ray 2.60's internals; another Ray keeps its own cleaner as it is
    from ray.train.v2._internal.callbacks import placement_group_callback as _pgc
    from ray.train.v2._internal.execution.controller import placement_group_cleaner as _cleaner
except ImportError:  # pragma: no cover
    _pgc = _cleaner = None


if _pgc is not None:
    class PatientCleaner(_cleaner.PlacementGroupCleaner):
        def __init__(self, *args, **kwargs):
            # This detached actor's process runs only the cleaner: patch its module here.
            _cleaner.is_actor_alive = alive_unless_recorded_dead
            super().__init__(*args, **kwargs)

    class PatientCleanerCallback(_pgc.PlacementGroupCleanerCallback):
        def after_controller_start(self, train_run_context):
            launch = _pgc.PlacementGroupCleaner
            _pgc.PlacementGroupCleaner = PatientCleaner  # the class the parent method launches
            try:
                super().after_controller_start(train_run_context)
            finally:
                _pgc.PlacementGroupCleaner = launch


def patched_callbacks(callbacks: list) -> list:
    if _pgc is None:
        return callbacks
    return [PatientCleanerCallback() if type(c) is _pgc.PlacementGroupCleanerCallback else c for c in callbacks]


class Trainer(TorchTrainer):
    """Ray Train's `TorchTrainer`, with the patient placement-group cleaner."""

    def _create_default_callbacks(self):
        return patched_callbacks(super()._create_default_callbacks())
