"""Rewards: the protocol, checks, an explicit registry and built-in rewards."""

from ..core.reward import CallableReward, CountingReward, Reward, as_reward, evaluate_reward, reward_name
from .quadratic import QuadraticReward
from .registry import available_rewards, get_reward, register_reward

__all__ = ["CallableReward", "CountingReward", "Reward", "as_reward", "evaluate_reward", "reward_name",
           "QuadraticReward", "available_rewards", "get_reward", "register_reward"]
