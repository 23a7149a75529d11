"""How ``tiered.CheckpointManager`` loads the step it chose: from the local tier, or, for a step
only the durable tier holds, straight from there when the store vouches for every byte
(``tiered.durable_restore: store``) with the local copy filled in the background, else
downloaded and verified first. A job of another shape reads only the chunks its shards need
(``load_needed``, ``tiered.storage.partial``)."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from tiered.errors import StepUnreadable, TieredError
from tiered.policy import may_read_in_place

if TYPE_CHECKING:
    from pathlib import Path

    from tiered.config import TieredConfig
    from tiered.storage import DurableTier, LocalTier
    from tiered.storage.partial import ArrayNeed, Need


class Owner(Protocol):
    """What the loader needs of the manager that owns it (``tiered.CheckpointManager``): its
    config, its durable tier, and a verified copy of a durable step into the local tier."""

    config: TieredConfig
    local: LocalTier

    @property
    def durable(self) -> DurableTier: ...
    def fetch(self, step: int) -> Any: ...
    def manager_over(self, directory: Path) -> Any:
        """An orbax manager over ``directory``, reading it as the local tier is read."""


log = logging.getLogger("tiered.manager")


class Loader:
    """Loads steps through ``local`` (the orbax manager over the local tier) or, in place, through
    one over the durable tier; ``multi``: several nodes, whose durable step is read locally."""

    def __init__(self, manager: Owner, ocp: Any, local: Any, *, multi: bool) -> None:
        self.manager = manager
        self.ocp = ocp
        self.local = local
        self.multi = multi
        self._filling: threading.Thread | None = None

    def load(self, step: int, source: str, target: Any, args: Any, *, orbax_form: bool) -> Any:
        m = self.manager
        if source == "durable" and self._store_vouches(step):
            ocp = self.ocp
            with ocp.CheckpointManager(
                m.config.durable_url, options=ocp.CheckpointManagerOptions(create=False)
            ) as durable:
                try:
                    state = self.load_from(durable, step, target, args, orbax_form=orbax_form)
                except Exception as err:  # e.g. tensorstore has other credentials: go local
                    log.warning(
                        "Reading step %d straight from %s failed (%s: %s); downloading it",
                        step,
                        m.durable.url,
                        type(err).__name__,
                        err,
                    )
                else:
                    log.info(
                        "Step %d read from %s, which vouched for every byte", step, m.durable.url
                    )
                    self._fill_local(step)
                    return state
        if source == "durable":
            m.fetch(step)
        return self.load_from(self.local, step, target, args, orbax_form=orbax_form)

    def _store_vouches(self, step: int) -> bool:
        m = self.manager
        mode = m.config.tiered.durable_restore
        if not may_read_in_place(durable_restore=mode, several_nodes=self.multi):
            return False
        try:
            return m.durable.vouched(step) is not None
        except TieredError as err:  # the download path reads the step again and says why
            log.debug("Step %d: no word from the store (%s); downloading it", step, err)
            return False

    def _fill_local(self, step: int) -> None:
        """Copy a step read from the durable tier into the local tier, verified, off the
        training thread; ``wait`` (the manager's ``close``) waits for it."""

        def fill() -> None:
            try:
                self.manager.fetch(step)
            except (TieredError, OSError) as err:
                log.warning("Could not copy step %d to the local tier: %s", step, err)

        self._filling = threading.Thread(target=fill, name="tiered-fill", daemon=True)
        self._filling.start()

    def wait(self) -> None:
        if self._filling is not None:
            self._filling.join()

    def load_agreed(
        self, step: int, source: str, target: Any, args: Any, *, orbax_form: bool
    ) -> tuple[Any, str]:
        """Load the step the nodes agreed on from ``source``: (the state, the tier it came
        from). A job of another size reads only what its shards need; a node whose part lacks
        what this mesh needs (the same nodes on another mesh) too, from the merged step."""
        from tiered.tiers import fetch_step

        m = self.manager
        done, state = False, None
        if source == "durable" and self._other_shape(step):
            done, state = self._try_needed(step, target, args, orbax_form=orbax_form)
        if done:
            return state, source
        try:
            return self.load(step, source, target, args, orbax_form=orbax_form), source
        except Exception as err:  # orbax raises many types for shards it cannot find
            if not m.durable.is_whole(step):
                raise
            # Another mesh on the same nodes: this node's part holds the old mesh's shards.
            log.warning(
                "Step %d: this node's part lacks shards this mesh needs (%s: %s); reading what "
                "it needs from %s",
                step,
                type(err).__name__,
                str(err).splitlines()[0][:200] if str(err) else "",
                m.durable.url,
            )
        done, state = self._try_needed(step, target, args, orbax_form=orbax_form)
        if not done:
            fetch_step(m.local, m.durable, step, whole=True)
            state = self.load(step, "local", target, args, orbax_form=orbax_form)
        return state, "durable"

    def _other_shape(self, step: int) -> bool:
        """Whether a durable step was written by a job of another node count."""
        m = self.manager
        try:
            return m.durable.read_manifest(step).nodes != m.config.tiered.num_nodes
        except (TieredError, FileNotFoundError):
            return False  # the download says why

    def _try_needed(
        self, step: int, target: Any, args: Any, *, orbax_form: bool
    ) -> tuple[bool, Any]:
        """``load_needed``, or (False, None) when it failed: then the step is read whole (and
        verified whole), which a restore must not be refused for."""
        try:
            return self.load_needed(step, target, args, orbax_form=orbax_form)
        except Exception as err:  # tensorstore and orbax raise many types
            log.warning(
                "Reading only what this process needs of step %d failed (%s: %s); reading the "
                "whole step",
                step,
                type(err).__name__,
                str(err).splitlines()[0][:300] if str(err) else "",
            )
            return False, None

    def load_needed(
        self, step: int, target: Any, args: Any, *, orbax_form: bool
    ) -> tuple[bool, Any]:
        """Restore a merged durable step reading only the keys of the chunks this process's
        shards cover (``tiered.storage.partial``), staged in ``.tiered/partial`` and removed
        once loaded: (True, the state), or (False, None) when this restore cannot say what it
        needs (no target with shardings) or the step has no key index: then it is read whole.
        A step that fails the check raises, as its download would."""
        from tiered.storage import partial

        m = self.manager
        need = needs_of(target, args, orbax_form=orbax_form)
        if need is None:
            return False, None
        manifest = m.durable.read_manifest(step)
        if not partial.readable(manifest):
            return False, None
        folder = m.local.tiered_dir / PARTIAL_DIR
        shutil.rmtree(folder, ignore_errors=True)  # a restore that died (one trainer per disk)
        dest = folder / str(os.getpid())
        try:
            partial.stage(m.durable, step, dest / str(step), need, manifest)
            mgr = m.manager_over(dest)
            try:
                return True, self.load_from(mgr, step, target, args, orbax_form=orbax_form)
            finally:
                mgr.close()
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def load_from(
        self, mgr: Any, step: int, target: Any, args: Any, *, orbax_form: bool = False
    ) -> Any:
        """One step through one orbax manager (the local one, or one over the durable tier)."""
        ocp = self.ocp
        mgr.reload()
        if orbax_form:  # orbax's own choice of handler when there are no args, as in orbax
            return mgr.restore(step, args=args)
        if target is not None:
            target = default_shardings(target)
        restore_args = (
            ocp.checkpoint_utils.construct_restore_args(target) if target is not None else None
        )
        return mgr.restore(step, args=ocp.args.PyTreeRestore(target, restore_args=restore_args))


PARTIAL_DIR = "partial"
"""Under the local tier's ``.tiered``: a step staged in part while it is being restored."""


def needs_of(target: Any, args: Any, *, orbax_form: bool) -> Need | None:
    """What this process reads of each item's arrays (``tiered.storage.partial.Need``), from
    the shardings of the target it restores into; None when it cannot say (no target): then
    it reads the step whole. ``PyTreeRestore`` and ``StandardRestore`` items name their
    target; any other item is read whole."""
    import orbax.checkpoint as ocp

    def item_of(a: Any) -> Any:
        if isinstance(a, ocp.args.PyTreeRestore):
            if a.transforms is not None or a.legacy_transform_fn is not None:
                # orbax's transforms read other keys than the target names, and read a
                # missing chunk as zeros: the item is read whole
                return None
            if a.restore_args is not None:
                return _as_read(a.item, a.restore_args)  # orbax reads by these, not the item's
            return a.item
        if isinstance(a, ocp.args.StandardRestore):
            return a.item
        return None

    if not orbax_form:
        items = {"default": target}
    elif isinstance(args, ocp.args.Composite):
        items = {name: item_of(a) for name, a in args.items()}
    else:
        items = {"default": item_of(args)}
    need: Need = {}
    for name, tree in items.items():
        if tree is not None:
            arrays = array_needs(tree)
            if arrays is None:
                return None
            need[name] = arrays
    return need or None


def _as_read(item: Any, restore_args: Any) -> Any:
    """The tree orbax reads with ``restore_args``: a sharded placeholder where an
    ``ArrayRestoreArgs`` names a sharding (or a mesh and its axes), None (read whole) elsewhere;
    None for the whole item when the two trees do not match."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    def read(leaf: Any, ra: Any) -> Any:
        if not isinstance(ra, ocp.ArrayRestoreArgs):
            return None
        if ra.restore_type not in (None, jax.Array):
            return None  # restored as numpy (or anything else): read whole, on every process
        # orbax's order (_deserialize_shardings): a mesh and its axes first, then the sharding
        if ra.mesh is not None and ra.mesh_axes is not None:
            sharding = jax.sharding.NamedSharding(ra.mesh, ra.mesh_axes)
        else:
            sharding = ra.sharding
        shape = ra.global_shape or getattr(leaf, "shape", None)
        if not isinstance(sharding, jax.sharding.Sharding) or shape is None:
            return None
        return jax.ShapeDtypeStruct(tuple(shape), np.float32, sharding=sharding)

    try:
        if item is None:
            return jax.tree.map(lambda ra: read(None, ra), restore_args)
        return jax.tree.map(read, item, restore_args)
    except (ValueError, TypeError):
        return None


def array_needs(tree: Any) -> dict[str, ArrayNeed] | None:
    """orbax's parameter name -> the boxes this process's devices hold of that array, for
    every leaf with a sharding (the others are read whole)."""
    import jax
    from orbax.checkpoint._src.tree import utils as tree_utils

    from tiered.storage.partial import ArrayNeed

    try:
        names = tree_utils.get_param_names(tree)
        pairs = jax.tree.leaves(
            jax.tree.map(lambda n, leaf: (n, leaf), names, tree),
            is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str),
        )
    except (ValueError, TypeError) as err:  # a tree orbax names otherwise: read it whole
        log.debug("No parameter names for the target (%s): reading the step whole", err)
        return None
    out: dict[str, ArrayNeed] = {}
    for name, leaf in pairs:
        sharding = getattr(leaf, "sharding", None)
        shape = getattr(leaf, "shape", None)
        if sharding is None or shape is None or not hasattr(sharding, "addressable_devices"):
            continue
        boxes = []
        for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
            box = []
            for s, dim in zip(index, shape, strict=True):
                if s.step not in (None, 1):
                    break
                box.append((s.start or 0, dim if s.stop is None else s.stop))
            else:
                boxes.append(tuple(box))
                continue
            boxes = []
            break
        if boxes:
            out[name] = ArrayNeed(tuple(int(d) for d in shape), tuple(dict.fromkeys(boxes)))
    return out


def default_shardings(target: Any) -> Any:
    """Abstract leaves without a sharding restore as jax arrays on the first local device (as
    orbax's StandardRestore does), not as numpy arrays."""
    import jax

    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def fix(leaf: Any) -> Any:
        if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device)
        return leaf

    return jax.tree.map(fix, target)


def named_step_failed(step: int, source: str, err: Exception, *, orbax_form: bool) -> NoReturn:
    """A restore that named its step gets that step or an error, never an older step and
    never None ("no checkpoint anywhere"). orbax's form raises what orbax raised."""
    if orbax_form:
        raise err
    raise StepUnreadable(
        f"step {step} from the {source} tier could not be restored: {type(err).__name__}: {err}"
    ) from err
