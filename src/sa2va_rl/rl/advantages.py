"""GRPO advantages in fp32 with a floored group std: no 0/0, no blow-up on near-ties."""

from __future__ import annotations

import torch
from trl.trainer.utils import nanstd


def weighted_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[N, funcs] -> [N] fp32: the weighted sum over the functions with an opinion; NaN where none had one."""
    rpf = rewards_per_func.float()
    unscorable = torch.isnan(rpf).all(dim=1)
    rewards = (rpf * weights.float().to(rpf.device)).nansum(dim=1)
    return torch.where(unscorable, torch.nan, rewards)


def group_advantages(rewards_per_func: torch.Tensor, weights: torch.Tensor, num_generations: int,
                     scale: str, std_floor: float) -> torch.Tensor:
    """Advantages in fp32: (r - group mean) / max(std, floor). NaN rewards are 'no opinion' (TRL's None).

    A completion with no reward at all gets advantage 0; a group whose rewards are all equal gets 0s
    (never 0/0); a near-tie cannot blow up past |r - mean| / std_floor.
    """
    rewards = weighted_rewards(rewards_per_func, weights)
    grouped = rewards.view(-1, num_generations)  # [groups, G]
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    # a group whose rewards are all equal is centred to exact zeros: its fp32 mean can sit an ulp off the rewards, and
    # those ~1e-8 "advantages" gave a gradient of ~1e-7 where there is no signal at all (the spike guard's window
    # then saw a 1e-7 norm among 0.3s; an exact zero it ignores)
    missing = grouped.isnan()
    tied = torch.where(missing, -torch.inf, grouped).amax(1) == torch.where(missing, torch.inf, grouped).amin(1)
    centred = torch.where(tied[:, None], 0.0, grouped - mean)
    if scale == "group":
        std = nanstd(grouped, dim=1).unsqueeze(1)
    elif scale == "batch":
        std = nanstd(rewards).expand(grouped.shape[0], 1)
    else:  # "none"
        std = torch.ones_like(mean)
    adv = centred / torch.nan_to_num(std, nan=0.0).clamp(min=std_floor)
    return torch.nan_to_num(adv.view(-1), nan=0.0)
