"""How ``tiered.CheckpointManager`` loads the step it chose: from the local tier, or, for a step
only the durable tier holds, straight from there when the store vouches for every byte
(``tiered.durable_restore: store``) with the local copy filled in the background, else
downloaded and verified first."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from tiered.errors import StepUnreadable, TieredError
from tiered.policy import may_read_in_place

if TYPE_CHECKING:
    from tiered.config import TieredConfig
    from tiered.storage import DurableTier


class Owner(Protocol):
    """What the loader needs of the manager that owns it (``tiered.CheckpointManager``): its
    config, its durable tier, and a verified copy of a durable step into the local tier."""

    config: TieredConfig

    @property
    def durable(self) -> DurableTier: ...
    def fetch(self, step: int) -> Any: ...


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
