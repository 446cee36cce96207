"""`from learner.group import LearnerGroup`: the name the launch pipeline imports (defined in learner.actor)."""

from learner.actor import LearnerActor, LearnerGroup

__all__ = ["LearnerActor", "LearnerGroup"]
