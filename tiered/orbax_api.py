"""orbax's side of ``tiered.CheckpointManager``: the local orbax manager it drives, and orbax's
``CheckpointManagerOptions`` read as tiered's settings.

A loop written for ``orbax.checkpoint.CheckpointManager(directory, options=...)`` switches by
changing the import and the constructor; the directory it names becomes the durable tier
(``checkpoint_dir``) and the local tier is the node's own disk. Options that mean something
here are translated, the harmless ones accepted, and the rest refused with the reason: a setting
that would silently not apply is worse than an error.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tiered.config import TieredConfig, TieredSettings
from tiered.config_check import config_from_mapping
from tiered.config_files import load_config
from tiered.errors import ConfigError

# orbax option -> tiered key, for the options that translate.
_TRANSLATED = {
    "save_interval_steps": "local_checkpoint_period",
    "max_to_keep": "max_num_checkpoints_to_keep",
    "enable_async_checkpointing": "async_checkpointing",
    "keep_period": "tiered.keep_period",
}
# Accepted as they are: tiered always creates the directories and cleans up its temporary ones.
_ACCEPTED = {"create", "cleanup_tmp_directories", "async_options", "file_options"}
_WHY_REFUSED = {
    "best_fn": "durable retention is tiered's: the newest max_to_keep plus every keep_period",
    "best_mode": "durable retention is tiered's: the newest max_to_keep plus every keep_period",
    "keep_checkpoints_without_metrics": "durable retention does not read metrics",
    "keep_time_interval": "durable retention keeps steps by number (keep_period), not by time",
    "should_keep_fn": "durable retention is tiered's: the newest max_to_keep plus keep_period",
    "preservation_policy": "durable retention is tiered's: the newest max_to_keep plus keep_period",
    "step_prefix": "step directories are plain integers on both tiers (the daemon reads them)",
    "step_format_fixed_length": "step directories are plain integers on both tiers",
    "step_name_format": "step directories are plain integers on both tiers",
    "save_on_steps": "local saves happen every save_interval_steps, plus preemption and final",
    "should_save_fn": "local saves happen every save_interval_steps, plus preemption and final",
    "save_decision_policy": "local saves happen every save_interval_steps, plus preemption/final",
    "single_host_load_and_broadcast": "every process restores its own shards from its own disk",
    "todelete_subdir": "the daemon deletes steps, marker first; nothing is kept aside",
    "todelete_full_path": "the daemon deletes steps, marker first; nothing is kept aside",
    "read_only": "open the durable tier with plain orbax to read without writing",
    "multiprocessing_options": "tiered sets them: each process writes its own local directory",
    "enable_per_process_directory_creation": "tiered sets it for multi-process jobs",
    "temporary_path_class": "local saves use orbax's rename; the daemon commits the durable tier",
    "atomicity_options": "local saves use orbax's rename; the daemon commits the durable tier",
}


def is_config_file(value: object) -> bool:
    """A YAML file (by its suffix, or because a file is there), not a checkpoint directory."""
    if not isinstance(value, str | os.PathLike) or "://" in str(value):
        return False
    path = Path(value).expanduser()
    return path.suffix in (".yml", ".yaml") or path.is_file()


def resolve_config(
    config: TieredConfig | str | os.PathLike[str],
    *,
    options: Any = None,
    local_dir: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> TieredConfig:
    """The settings a ``CheckpointManager`` runs with.

    With ``options``, its translated fields apply as orbax would apply them, defaults included
    (orbax saves every step unless ``save_interval_steps`` says otherwise; it keeps every step
    unless ``max_to_keep`` does): ``save_interval_steps`` is the local period, ``max_to_keep``
    and ``keep_period`` the durable retention, ``enable_async_checkpointing`` as it says; the
    durable period is five local periods unless the file sets one.

    ``config`` is a ``TieredConfig``, a YAML file, or (as orbax takes it) the checkpoint
    directory, which becomes the durable tier; then the local tier is ``local_dir`` or
    ``TIERED_LOCAL_CHECKPOINT_DIRECTORY``. ``options`` (orbax's ``CheckpointManagerOptions``)
    override what the file says.
    """
    environ = os.environ if env is None else env
    if isinstance(config, TieredConfig):
        data = config.model_dump()
    elif is_config_file(config):
        if local_dir is not None:
            raise ConfigError(
                f"local_dir= goes with a checkpoint directory; {config} names its own "
                "local_checkpoint_directory"
            )
        if options is None:
            return load_config(config, env=environ)
        data = load_config(config, env=environ).model_dump()
    else:
        data = {"checkpoint_dir": str(config)}
        local = local_dir or environ.get("TIERED_LOCAL_CHECKPOINT_DIRECTORY")
        if not local:
            raise ConfigError(
                f"{config} is the durable tier; give the node-local one too: "
                "CheckpointManager(directory, local_dir='/local/ssd/...') or "
                "TIERED_LOCAL_CHECKPOINT_DIRECTORY"
            )
        data["local_checkpoint_directory"] = str(local)
    if options is not None:
        data = _apply_options(data, options)
    return config_from_mapping(data, env=environ, source="CheckpointManager")


def _apply_options(data: dict[str, Any], options: Any) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    if not isinstance(options, ocp.CheckpointManagerOptions):
        raise ConfigError(
            f"options= takes orbax.checkpoint.CheckpointManagerOptions, got "
            f"{type(options).__name__}"
        )
    default = ocp.CheckpointManagerOptions()
    out = dict(data)
    section = dict(out.get("tiered") or {})
    for field in dataclasses.fields(options):
        name = field.name
        value = getattr(options, name)
        key = _TRANSLATED.get(name)
        if key is None and (value == getattr(default, name) or name in _ACCEPTED):
            continue
        if key is None:
            why = _WHY_REFUSED.get(name, "it has no meaning for a two-tier checkpoint")
            raise ConfigError(f"CheckpointManagerOptions.{name}={value!r} is not supported: {why}")
        if key.startswith("tiered."):
            section[key.removeprefix("tiered.")] = value
        else:
            out[key] = value
    if "checkpoint_period" not in data:  # every fifth local step becomes durable
        out["checkpoint_period"] = 5 * options.save_interval_steps
    if section:
        out["tiered"] = section
    return out


def local_manager(
    cfg: TieredConfig,
    *,
    multi: bool,
    on_saved: Callable[[], None] | None = None,
    directory: Path | None = None,
) -> Any:
    """The orbax manager of the local tier (or of ``directory``, read as the local tier is:
    a step staged in part, ``tiered.loading``); ``on_saved`` is called on orbax's finalize
    thread as each asynchronous save completes (its ``post_finalization_callback``).

    Local saves are uncompressed unless ``tiered.local_compression`` is on: zstd (level 3
    under zarr3) is most of a save's host CPU, paid every local period, and over high-entropy
    weights it saves under 10% of the bytes (docs/configuration.md has the numbers). Their data
    files are ``tiered.local_data_file_size`` each (``local_pytree_handler``).

    ``PyTreeSave`` / ``StandardSave`` items (the simple API saves one ``PyTreeSave``) get that
    handler; any other item type (``JsonSave``, a data iterator's) gets orbax's own registered
    handler, so ``Composite`` works as it does in orbax. Standard items are recorded as orbax's
    ``StandardCheckpointHandler``, so plain orbax reads them back.

    With several processes each local directory holds this process's shards only, as in
    orbax's own local checkpoints for multi-tier checkpointing: every process writes its own
    metadata and commit marker (``primary_host=None``) and every shard it holds, replicated or
    not (``replica_id=None``), so each node's directory restores on its own.
    """
    import jax
    import orbax.checkpoint as ocp

    kwargs: dict[str, Any] = {}
    options: dict[str, Any] = {}
    if multi:
        mp = ocp.options.MultiprocessingOptions(primary_host=None)
        kwargs["multiprocessing_options"] = mp
        kwargs["type_handler_registry"] = ocp.type_handlers.create_type_handler_registry(
            (
                jax.Array,
                ocp.type_handlers.ArrayHandler(
                    primary_host=None, replica_id=None, use_replica_parallel=False
                ),
            )
        )
        options = {"multiprocessing_options": mp, "enable_per_process_directory_creation": True}
    if on_saved is not None:
        options["async_options"] = ocp.options.AsyncOptions(post_finalization_callback=on_saved)
    create = True
    if directory is not None:
        # A step staged for this process alone: a manager of this process, with no barrier
        # across the job (orbax's create_directory is one), since only some processes may
        # stage (the others restore their local part, or fell back to the whole step).
        create = False
        options["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
            primary_host=None, active_processes={jax.process_index()}
        )
        options.pop("enable_per_process_directory_creation", None)
    pytree = local_pytree_handler(cfg.tiered, **kwargs)
    standard = _standard_handler(pytree)
    handlers = ocp.handlers.DefaultCheckpointHandlerRegistry()
    handlers.add(None, ocp.args.PyTreeSave, pytree)
    handlers.add(None, ocp.args.PyTreeRestore, pytree)
    handlers.add(None, ocp.args.StandardSave, standard)
    handlers.add(None, ocp.args.StandardRestore, standard)
    return ocp.CheckpointManager(
        str(directory or cfg.local_dir),
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=cfg.local_checkpoint_period,
            max_to_keep=None,
            enable_async_checkpointing=cfg.async_checkpointing,
            create=create,
            cleanup_tmp_directories=True,
            **options,
        ),
        handler_registry=handlers,
    )


def local_pytree_handler(settings: TieredSettings, **kwargs: Any) -> Any:
    """orbax's ``PyTreeCheckpointHandler`` as the local tier writes: OCDBT and zarr3, zstd as
    ``local_compression`` says, and data files of ``local_data_file_size`` unless a save's
    ``PyTreeSave`` names its own ``ocdbt_target_data_file_size``.

    orbax's default target (2 GiB for a local path) puts a whole state of up to 2 GiB in one
    data file: one thread copies it into the page cache and fsyncs it at commit, after the copy.
    Files of a few hundred MB are written and flushed by several threads while the rest is
    still being copied. The format is unchanged (plain orbax reads it, and records it under
    orbax's own handler name); only how many files the OCDBT database has.
    """
    import orbax.checkpoint as ocp

    size = settings.local_data_file_size

    def sized(args: Any, item: Any, save_args: Any) -> Any:
        if args is None:
            args = ocp.args.PyTreeSave(item, save_args=save_args)
        if args.ocdbt_target_data_file_size is None:
            args = dataclasses.replace(args, ocdbt_target_data_file_size=size)
        return args

    class LocalPyTree(ocp.PyTreeCheckpointHandler):
        typestr = ocp.PyTreeCheckpointHandler.typestr

        async def async_save(
            self, directory: Any, item: Any = None, save_args: Any = None, args: Any = None
        ) -> Any:
            return await super().async_save(directory, args=sized(args, item, save_args))

        def save(
            self, directory: Any, item: Any = None, save_args: Any = None, args: Any = None
        ) -> None:
            super().save(directory, args=sized(args, item, save_args))

    return LocalPyTree(
        use_ocdbt=True, use_zarr3=True, use_compression=settings.local_compression, **kwargs
    )


def _standard_handler(pytree: Any) -> Any:
    """orbax's ``StandardCheckpointHandler`` over tiered's PyTree handler (its compression and
    multi-process settings); it records itself under orbax's own name."""
    import orbax.checkpoint as ocp

    class Standard(ocp.StandardCheckpointHandler):
        typestr = ocp.StandardCheckpointHandler.typestr

        def __init__(self) -> None:
            super().__init__()
            self._impl = pytree  # orbax keeps the handler it delegates to here

    return Standard()


def is_disk_full(err: BaseException) -> bool:
    """Whether ENOSPC is anywhere in an exception's chain (orbax wraps the OS error)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def plain_metrics(metrics: Any) -> Any:
    """Metrics as JSON can hold them (jax and numpy scalars become numbers)."""
    if isinstance(metrics, dict):
        return {str(k): plain_metrics(v) for k, v in metrics.items()}
    if isinstance(metrics, list | tuple):
        return [plain_metrics(v) for v in metrics]
    if hasattr(metrics, "item") and getattr(metrics, "shape", None) == ():
        return metrics.item()
    return metrics


def jax_topology(cfg: Any) -> bool:
    """Whether this is one process of a multi-process JAX job, checked against the config's
    ``tiered.num_nodes`` and ``tiered.node_rank`` (``ConfigError`` when they disagree)."""
    import jax

    procs, index = jax.process_count(), jax.process_index()
    if procs == 1 and cfg.num_nodes == 1:
        return False
    if cfg.num_nodes != procs or cfg.node_rank != index:
        raise ConfigError(
            f"JAX runs {procs} processes and this is process {index}, but the config says "
            f"tiered.num_nodes: {cfg.num_nodes} and tiered.node_rank: {cfg.node_rank}. Set "
            "both (TIERED_NUM_NODES, TIERED_NODE_RANK) for the trainer and for this node's "
            "daemon, so that each node uploads only its own files."
        )
    return True
