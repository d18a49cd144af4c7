"""Rewards: the protocol, checks, an explicit registry and built-in rewards."""

from ..core.reward import CallableReward, CountingReward, Reward, as_reward, evaluate_reward, reward_name
from .quadratic import QuadraticReward
from .registry import available_rewards, get_reward, register_reward

__all__ = ["CallableReward", "CountingReward", "Reward", "as_reward", "evaluate_reward", "reward_name",
           "QuadraticReward", "available_rewards", "get_reward", "register_reward"]

# issue 6: the image reward zoo (transformers is imported only when a CLIP/BLIP reward is built)
from . import blip, clip_rewards, simple  # noqa: E402,F401  (registers brightness, saturation, jpeg, ...)
from .combine import WeightedReward, build_term, parse_reward_spec, reward_from_spec  # noqa: E402
from .user import load_user_reward  # noqa: E402

__all__ += ["WeightedReward", "build_term", "load_user_reward", "parse_reward_spec", "reward_from_spec"]
