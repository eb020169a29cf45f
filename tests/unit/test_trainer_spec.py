"""The trainer config's schema: every conf/trainer option builds, and bad values are refused
naming the key."""

from __future__ import annotations

import pytest

from framework.config import CONF_DIR, build
from framework.errors import ConfigError
from framework.lightning.spec import TrainerSpec

OPTIONS = sorted(p.stem for p in (CONF_DIR / "trainer").glob("*.yaml"))


@pytest.mark.parametrize("option", OPTIONS)
def test_every_trainer_option_builds(option: str, compose_cfg) -> None:
    cfg = compose_cfg([f"trainer={option}"])
    spec = build(cfg.trainer, "trainer")
    assert isinstance(spec, TrainerSpec)
    assert spec.strategy == ("single" if option in ("cpu", "gpu") else option)
    assert spec.batch_size % spec.world_size == 0


def test_launcher_follows_the_process_count() -> None:
    assert TrainerSpec().resolved_launcher() == "inprocess"
    assert TrainerSpec(strategy="fsdp2", devices=2).resolved_launcher() == "torchrun"
    assert TrainerSpec(strategy="fsdp2", devices=2, num_nodes=2).resolved_launcher() == "srun"
    # Sharding rewrites the modules it is given, so even one rank trains in a worker, on
    # CPU and GPU alike (and DeepSpeed on CPU needs torchrun's process group)
    for strategy in ("deepspeed_zero3", "deepspeed_zero2", "fsdp2"):
        for accelerator in ("cpu", "gpu"):
            one = TrainerSpec(strategy=strategy, accelerator=accelerator, devices=1)
            assert one.resolved_launcher() == "torchrun", (strategy, accelerator)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"devices": 0}, "devices"),
        ({"strategy": "single", "devices": 2}, "strategy"),
        ({"strategy": "fsdp2", "devices": 2, "batch_size": 3}, "batch_size"),
        ({"strategy": "fsdp2", "devices": 2, "offload_optimizer": True}, "offload_optimizer"),
        ({"max_steps": 0}, "max_steps"),
        ({"max_minutes": 0}, "max_minutes"),
        ({"max_minutes": -1.0}, "max_minutes"),
        ({"max_minutes": "ten"}, "max_minutes"),
        ({"strategy": "deepspeed_zero3", "launcher": "inprocess"}, "launcher"),
        ({"strategy": "fsdp2", "devices": 2, "launcher": "inprocess"}, "launcher"),
    ],
)
def test_bad_values_name_their_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        TrainerSpec(**kwargs)
    assert err.value.argument == key


def test_a_typo_in_the_trainer_config_is_a_config_error(compose_cfg) -> None:
    from framework.config import check_config

    cfg = compose_cfg(["trainer=fsdp2", "+trainer.devcies=4"])
    with pytest.raises(Exception, match=r"trainer\.devcies"):
        check_config(cfg)
