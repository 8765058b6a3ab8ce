"""The KL coefficient β of online RL: fixed, or adapted towards a target KL.

Both controllers hold plain floats and save to / load from a dict, so a checkpoint of an online stage
restores β exactly (a resumed run must continue with the β it had, not the initial one).
"""

from __future__ import annotations


class FixedKLController:
    """β constant (the REBEL reference's online scripts, GRPO, RLOO)."""

    def __init__(self, beta: float):
        self.beta = float(beta)

    def update(self, kl: float, n_steps: int) -> float:
        """Nothing changes; returns β."""
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])


class AdaptiveKLController:
    """Proportional control of β towards a target KL.

    Ziegler et al., "Fine-Tuning Language Models from Human Preferences", arXiv 1909.08593,
    Sec. 2.2::

        e_t     = clip(KL_t / KL_target − 1, −0.2, 0.2)
        β_{t+1} = β_t (1 + K_β e_t),     K_β = n_steps / horizon

    where KL_t is the mean sequence KL (nats) of the step's rollouts and n_steps the episodes in it
    (TRL's ``AdaptiveKLController``). β rises when the policy drifts past the target, falls below it.
    """

    def __init__(self, beta: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"the adaptive KL controller needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.beta, self.target, self.horizon = float(beta), float(target), int(horizon)

    def update(self, kl: float, n_steps: int) -> float:
        """Move β after a step whose rollouts had mean sequence KL ``kl`` (nats) over ``n_steps``
        episodes; returns the new β."""
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])
