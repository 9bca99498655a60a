"""The launcher presets compose onto the plugin's typed schema; the launch section is validated at start."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from rcm.config import CONFIG_DIR, ConfigError, load_config, register_configs

# pytest resets warning filters per test; the presets' schema matching is intended (see rcm/launch/__init__.py).
pytestmark = pytest.mark.filterwarnings(r"ignore:(?s).*validated against ConfigStore schema with the same name")


def compose_with_hydra(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=["experiment=toy_rcm", *overrides], return_hydra_config=True)


def test_slurm_preset_runs_one_task_per_gpu_and_requeues():
    cfg = compose_with_hydra(["hydra/launcher=submitit_slurm", "hydra.launcher.gpus_per_node=4", "hydra.launcher.nodes=2",
                              "launch.max_requeues=7"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == 4 and launcher.nodes == 2
    assert launcher.max_num_timeout == 7  # submitit's cap follows launch.max_requeues
    assert launcher.additional_parameters.requeue is True
    assert launcher.signal_delay_s > 0 and launcher.name == "toy_rcm"
    for key in ("partition", "account", "qos", "constraint", "cpus_per_task", "mem_gb", "timeout_min"):
        assert key in launcher
    assert any("SLURM_KILL_BAD_EXIT=1" in line for line in launcher.setup)


def test_local_preset_composes():
    launcher = compose_with_hydra(["hydra/launcher=submitit_local"]).hydra.launcher
    assert launcher._target_.endswith("LocalLauncher") and launcher.tasks_per_node == 1


def test_misspelt_launcher_key_fails_at_composition():
    with pytest.raises(Exception, match="partitoin"):
        compose_with_hydra(["hydra/launcher=submitit_slurm", "hydra.launcher.partitoin=gpu"])


def test_launch_section_is_validated():
    cfg = load_config(["experiment=toy_rcm", "launch.collective_timeout_minutes=5", "launch.hang_timeout_minutes=10"])
    assert OmegaConf.to_container(cfg.launch)["nccl_env"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    with pytest.raises(ConfigError, match="launch.hang_timeout_minutes"):
        load_config(["experiment=toy_rcm", "launch.collective_timeout_minutes=30", "launch.hang_timeout_minutes=20"])
    load_config(["experiment=toy_rcm", "launch.hang_timeout_minutes=0"])  # 0 disables the watchdog
    with pytest.raises(ConfigError, match="launch.max_requeue"):
        load_config(["experiment=toy_rcm", "+launch.max_requeue=3"])


def test_lease_timeout_must_outlast_two_heartbeats():
    """A lease refreshed every heartbeat_every_s would look stale to a newcomer between two refreshes otherwise."""
    assert load_config(["experiment=toy_rcm"]).launch.lease_timeout_minutes == 10.0
    load_config(["experiment=toy_rcm", "launch.heartbeat_every_s=30", "launch.lease_timeout_minutes=1.01"])
    with pytest.raises(ConfigError, match=r"launch.lease_timeout_minutes \(1.0\) must be longer than two heartbeats"):
        load_config(["experiment=toy_rcm", "launch.heartbeat_every_s=30", "launch.lease_timeout_minutes=1"])


def test_non_finite_budget_keys_are_validated():
    cfg = load_config(["experiment=toy_rcm"])
    assert (cfg.train.max_skipped_updates, cfg.train.skipped_updates_window) == (10, 100)
    for override in ("train.max_skipped_updates=-1", "train.skipped_updates_window=0"):
        with pytest.raises(ConfigError, match="train.max_skipped_updates must be at least 0"):
            load_config(["experiment=toy_rcm", override])
