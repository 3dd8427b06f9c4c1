"""An exponential moving average of the trainable set (SSF's FGVC recipe evaluates one with decay 0.9998;
diffusion fine-tuning keeps one too). Only what trains is averaged, so it costs a copy of KBs to MBs,
not of the backbone."""

from __future__ import annotations

import torch

from mmpeft.core.model import PeftModel

__all__ = ["TrainableEMA"]


class TrainableEMA:
    """`shadow = decay * shadow + (1 - decay) * current` after every optimizer step, over the model's
    trainable state (parameters and the buffers of modules that train whole, e.g. a head's BatchNorm)."""

    def __init__(self, model: PeftModel, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.reset(model)

    @staticmethod
    def _trainable(model: PeftModel) -> dict[str, torch.Tensor]:
        state = model.state_dict(keep_vars=True)
        return {k: state[k] for k in model.trainable_state_dict()}

    def _live(self, model: PeftModel) -> dict[str, torch.Tensor]:
        """The model's trainable state, which must be the set the average was started on."""
        live = self._trainable(model)
        if live.keys() != self.shadow.keys():
            new, gone = sorted(live.keys() - self.shadow.keys()), sorted(self.shadow.keys() - live.keys())
            raise RuntimeError(
                f"the model's trainable set changed after its EMA was started (new: {new[:3]}, gone: {gone[:3]}); "
                "call ema.reset(model) once the model is complete (e.g. after adding a component with a method)"
            )
        return live

    def reset(self, model: PeftModel) -> None:
        """Start the average at the model's current weights (again, after the model gained trainable tensors)."""
        self.shadow = {k: v.detach().clone() for k, v in self._trainable(model).items()}

    @torch.no_grad()
    def update(self, model: PeftModel) -> None:
        for key, live in self._live(model).items():
            shadow = self.shadow[key]
            if shadow.device != live.device:
                shadow = self.shadow[key] = shadow.to(live.device)
            if shadow.is_floating_point():
                shadow.lerp_(live.detach(), 1.0 - self.decay)
            else:
                shadow.copy_(live)

    @torch.no_grad()
    def swap(self, model: PeftModel) -> None:
        """Exchange the model's weights and the average (call twice to undo)."""
        for key, live in self._live(model).items():
            current = live.detach().clone()
            live.copy_(self.shadow[key].to(live.device))
            self.shadow[key] = current

    @torch.no_grad()
    def copy_to(self, model: PeftModel) -> None:
        for key, live in self._live(model).items():
            live.copy_(self.shadow[key].to(live.device))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = self.shadow.keys() - state.keys()
        if missing:
            raise KeyError(f"the checkpoint's EMA lacks {sorted(missing)[:3]}")
        self.shadow = {k: state[k].clone() for k in self.shadow}
