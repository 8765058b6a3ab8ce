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
    The clipped error bounds each step's factor to [1 − 0.2 K_β, 1 + 0.2 K_β]; β stays positive only
    while K_β < 5, so a step of more than 5 × horizon episodes is refused (``online.*.kl_horizon`` is
    validated against the episodes per step before any work: ``params.OnlineParams``).
    """

    def __init__(self, beta: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"the adaptive KL controller needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.beta, self.target, self.horizon = float(beta), float(target), int(horizon)

    def update(self, kl: float, n_steps: int) -> float:
        """Move β after a step whose rollouts had mean sequence KL ``kl`` (nats) over ``n_steps``
        episodes; returns the new β.

        Raises:
            ValueError: ``n_steps`` ≥ 5 × horizon (the factor could reach 0 or below: a negative β
                would reward the KL it should penalise).
        """
        if n_steps >= 5 * self.horizon:
            raise ValueError(f"the adaptive KL controller's horizon {self.horizon} is too short for {n_steps} episodes "
                             "per step: β could turn negative (it needs horizon > n_steps / 5)")
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])
