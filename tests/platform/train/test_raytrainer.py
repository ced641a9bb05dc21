"""The Ray 2.60 workaround in platform/train/raytrainer.py: a missing State API answer
must not count as a dead controller (it tore down healthy runs on a loaded head node)."""
from __future__ import annotations

from types import SimpleNamespace

from ray.train import ScalingConfig

from mamba_slm.platform.train import raytrainer


def test_only_a_recorded_death_is_death(monkeypatch):
    import ray.util.state
    from ray.util.state.exception import RayStateApiException

    answers = {"missing": None, "alive": SimpleNamespace(state="ALIVE"), "dead": SimpleNamespace(state="DEAD")}

    def get_actor(actor_id, address=None, timeout=30):
        if actor_id == "no-dashboard":
            raise RayStateApiException("no dashboard")
        return answers[actor_id]

    monkeypatch.setattr(ray.util.state, "get_actor", get_actor)
    assert raytrainer.alive_unless_recorded_dead("missing", 1)
    assert raytrainer.alive_unless_recorded_dead("no-dashboard", 1)
    assert raytrainer.alive_unless_recorded_dead("alive", 1)
    assert not raytrainer.alive_unless_recorded_dead("dead", 1)


def test_the_trainer_launches_the_patient_cleaner():
    trainer = raytrainer.Trainer(lambda: None, scaling_config=ScalingConfig(num_workers=1))
    kinds = [type(c) for c in trainer._create_default_callbacks()]
    assert raytrainer.PatientCleanerCallback in kinds
    assert not any(k.__name__ == "PlacementGroupCleanerCallback" for k in kinds)


def test_patient_cleaner_keeps_a_live_run(monkeypatch, missing_answers=3):
    """The cleaner's monitor loop, as Ray runs it, with the patched liveness test: a few
    missing answers, then a recorded death; the placement group goes only after the death."""
    from ray.train.v2._internal.execution.controller import placement_group_cleaner as module

    answers = [None] * missing_answers + [SimpleNamespace(state="DEAD")]
    removed = []
    monkeypatch.setattr("ray.util.state.get_actor", lambda actor_id, address=None, timeout=30: answers.pop(0))
    monkeypatch.setattr(module, "remove_placement_group", removed.append)
    monkeypatch.setattr(module, "is_actor_alive", module.is_actor_alive)  # restored after the test
    cleaner = raytrainer.PatientCleaner(controller_actor_id="c", check_interval_s=0.01, get_actor_timeout_s=1,
                                        stop_timeout=1)
    monkeypatch.setattr(cleaner, "_is_placement_group_removed", lambda pg: False)
    monkeypatch.setattr(cleaner, "_exit", lambda: None)
    pg = SimpleNamespace(id="pg")
    cleaner.register_placement_group(pg)
    cleaner._monitor_loop()
    assert removed == [pg] and answers == []
