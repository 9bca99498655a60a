"""Running on a cluster: the launcher's environment mapped to torch.distributed (``environment``), stop
signals polled by the training loop (``signals``), requeue after the stop checkpoint (``requeue``),
per-rank heartbeats with a hang watchdog (``heartbeat``), and one writer per run directory (``lease``).
Slurm scripts live in ``slurm/``; Hydra launcher presets in ``configs/hydra/launcher/``.

Import the submodules directly (``from rcm.launch.signals import StopRequest``); this package imports
nothing else so that ``rcm.parallel`` can use ``rcm.launch.environment`` without an import cycle.
"""
import warnings

# configs/hydra/launcher/submitit_{slurm,local}.yaml carry the plugin's config names on purpose: Hydra then
# validates them against the plugin's schema (a misspelt key fails at start), and warns that this
# matching is deprecated. Silenced here because this package is imported in the launching process and
# in every submitit job before the config is composed.
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")
