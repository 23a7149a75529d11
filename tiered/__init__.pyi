"""Types of the public surface (``__init__.py`` loads these names on first use)."""

from tiered.config import TieredConfig as TieredConfig
from tiered.config_check import config_from_mapping as config_from_mapping
from tiered.config_files import load_config as load_config
from tiered.errors import AgreementTimeout as AgreementTimeout
from tiered.errors import AlreadyRunning as AlreadyRunning
from tiered.errors import ChecksumMismatch as ChecksumMismatch
from tiered.errors import CommitError as CommitError
from tiered.errors import ConfigError as ConfigError
from tiered.errors import LayoutError as LayoutError
from tiered.errors import NotFound as NotFound
from tiered.errors import PeerProtocolMismatch as PeerProtocolMismatch
from tiered.errors import PeerRefused as PeerRefused
from tiered.errors import ReplicatorConfigError as ReplicatorConfigError
from tiered.errors import StepExists as StepExists
from tiered.errors import StepUnreadable as StepUnreadable
from tiered.errors import StorageError as StorageError
from tiered.errors import TieredError as TieredError
from tiered.manager import CheckpointManager as CheckpointManager
from tiered.manager import Restored as Restored
from tiered.manifest import Manifest as Manifest
from tiered.report import TierStatus as TierStatus
from tiered.status_client import collect_status as collect_status
from tiered.storage import DurableTier as DurableTier
from tiered.storage import LocalTier as LocalTier
from tiered.tiers import fetch_step as fetch_step
from tiered.tiers import promote_step as promote_step

__version__: str
__all__: list[str]

def status(config: TieredConfig | str) -> TierStatus: ...
