"""A trained run's task rebuilt for inference (sampling, export): from its run folder or its config files and an
adapter file, the model alone (no data, trainer or run folder), checked by `mmpeft fit`'s own parser."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmpeft.core.errors import MmpeftError

__all__ = ["resolve_run", "task_from_configs", "data_from_configs"]


def task_from_configs(configs: list[str], adapter: str | None = None, source: str | None = None,
                      overrides: Sequence[str] = ()) -> Any:  # fmt: skip
    """The run's task (model only: no data, trainer or run folder) from `fit` config files, with `adapter`
    loaded; the configs are checked by `mmpeft fit`'s own parser first. `source`: another weights folder for the
    backbone (a merged `mmpeft export --format diffusers` folder, which needs no adapter)."""
    from jsonargparse import ArgumentParser

    from mmpeft.tasks.base import PeftTask

    fit = _fit_config(configs, overrides)
    seed = fit.get("seed_everything")
    if isinstance(seed, int) and not isinstance(seed, bool):  # as `fit` seeds before it builds the model
        from pytorch_lightning import seed_everything

        seed_everything(seed, verbose=False)
    model = fit.model.as_dict() if hasattr(fit.model, "as_dict") else dict(fit.model)
    if adapter is not None:
        model.setdefault("init_args", {})["adapter"] = str(adapter)
    if source is not None:
        backbone = model.setdefault("init_args", {}).get("backbone")
        if not isinstance(backbone, dict) or "init_args" not in backbone:
            raise MmpeftError("--source replaces the backbone's weights folder; this config names its backbone by name")
        backbone["init_args"]["source"] = str(source)
    only_model = ArgumentParser(exit_on_error=False)
    only_model.add_subclass_arguments(PeftTask, "model", required=True)
    return only_model.instantiate_classes(only_model.parse_object({"model": model})).model


def _fit_config(configs: list[str], overrides: Sequence[str] = ()) -> Any:
    """The `fit` section of the configs and `fit`-style overrides (`--data.init_args.root DIR`), checked by
    `mmpeft fit`'s own parser."""
    from mmpeft.lab.lightning_cli import build_parser

    return build_parser().parse_args(["fit", *(a for c in configs for a in ("-c", c)), *overrides])["fit"]


def data_from_configs(configs: list[str], overrides: Sequence[str] = ()) -> Any:
    """The run's datamodule alone (no model, trainer or run folder), from `fit` config files and overrides."""
    import pytorch_lightning as pl
    from jsonargparse import ArgumentParser

    fit = _fit_config(configs, overrides)
    data = fit.data.as_dict() if hasattr(fit.data, "as_dict") else dict(fit.data)
    only_data = ArgumentParser(exit_on_error=False)
    only_data.add_subclass_arguments(pl.LightningDataModule, "data", required=True)
    return only_data.instantiate_classes(only_data.parse_object({"data": data})).data


def resolve_run(
    run_dir: str | None, configs: list[str], adapter: str | None, default_out: str
) -> tuple[list[str], str | None, Path]:
    """(config files, adapter file, default output folder) of `--run RUN` and / or `-c CONFIG --adapter FILE`:
    a run folder gives its `config.yaml` and `adapter.safetensors` (explicit ones win)."""
    configs = list(configs)
    if run_dir is not None:
        run = Path(run_dir)
        if not (run / "config.yaml").is_file():
            raise MmpeftError(f"{run} is not a run folder (no config.yaml in it); pass --run runs/<name>/version_N")
        configs = [str(run / "config.yaml"), *configs]
        if adapter is None and (run / "adapter.safetensors").is_file():
            adapter = str(run / "adapter.safetensors")
    if not configs:
        raise MmpeftError("give the run: --run RUN_FOLDER, or -c CONFIG [--adapter FILE]")
    out = Path(run_dir) / default_out if run_dir else Path(default_out)
    return configs, adapter, out
